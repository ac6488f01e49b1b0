"""`from core.worker_manager import WorkerManager`: the seed's programmatic API (`core.processes.worker_api`).

The supervisor of `python main.py --workers` is `core.processes.supervisor`; its plan, slots and the draining
of parked sessions are `core.processes.worker_plan`, `core.processes.worker_slots` and `core.processes.parked_sessions`. Their
names are importable from here too.
"""

from core.processes.parked_sessions import PARKED_MARKER_TIMEOUT, PARKED_PROBE_MISSES, ParkedSessions  # noqa: F401
from core.processes.supervisor import STARTUP_GRACE, Supervisor, SupervisorService, run_supervisor  # noqa: F401
from core.processes.supervisor_shutdown import STOP_GRACE  # noqa: F401
from core.processes.worker_api import WorkerManager  # noqa: F401
from core.processes.worker_plan import (WorkerPlan, autoscale_plan, available_cpus, ordered_route_processes,  # noqa: F401
                              plan_workers, supervisor_plan)
from core.processes.worker_plan import settings_overrides as _settings_overrides  # noqa: F401
from core.processes.worker_slots import WorkerProcess, WorkerSlot, describe_exit  # noqa: F401
