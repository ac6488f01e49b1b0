"""How many worker processes `--workers` starts, which shared routes each one serves, and which settings
it passes them (those that differ from the environment they inherit)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from core.processes.autoscale import ScalePolicy
from core.foundation.config import SETTING_NAMES, Settings, load_settings
from core.runtime.ordering import check_ordered_routes

if TYPE_CHECKING:
    from core.routing.router import Route


@dataclass(frozen=True)
class WorkerPlan:
    """How many worker processes, and which shared routes each one subscribes to."""

    count: int
    all_routes: bool  # True: each worker serves every shared route
    reason: str


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_workers(shared: Sequence["Route"], workers: int | None, cpus: int) -> WorkerPlan:
    """The process count.

    - `workers=N` (`--workers N` or WORKER_COUNT): N processes, each on every shared route.
    - `workers=None` (`--workers` alone): if some shared route sets `worker_count` above 1,
      the largest `worker_count` processes, worker i on the shared routes with worker_count > i
      (so each route has exactly its worker_count subscribers); otherwise one per CPU core, each
      on every shared route.
    """
    if not shared:
        return WorkerPlan(0, True, "no shared routes")
    if workers is not None:
        if workers < 1:
            raise ValueError(f"the number of workers must be at least 1, not {workers}")
        return WorkerPlan(workers, True, f"--workers {workers} / WORKER_COUNT: every worker on every shared route")
    largest = max(route.worker_count for route in shared)
    if largest > 1:
        return WorkerPlan(largest, False, f"the largest worker_count of the shared routes ({largest})")
    return WorkerPlan(cpus, True, f"one per CPU core ({cpus}); no shared route sets worker_count")


def autoscale_plan(plan: WorkerPlan, policy: ScalePolicy) -> WorkerPlan:
    """WORKER_AUTO_SCALE: start with the planned count within the bounds, every worker on every shared route."""
    count = policy.clamp(plan.count)
    return WorkerPlan(count, True, f"autoscaling between WORKER_MIN_COUNT={policy.min_count} and "
                                   f"WORKER_MAX_COUNT={policy.max_count}, starting at {count} ({plan.reason})")


def ordered_route_processes(plan: WorkerPlan, most: int | None = None) -> Callable[["Route"], int]:
    """How many worker processes may subscribe to a shared route under `plan` (for `check_ordered_routes`);
    `most`: the autoscaler's WORKER_MAX_COUNT, when it may add workers."""
    count = max(plan.count, most or 0)
    return lambda route: count if plan.all_routes else min(route.worker_count, count)


def supervisor_plan(shared: Sequence["Route"], workers: int | None, settings: Settings) -> WorkerPlan:
    """The plan `--workers [N]` runs, WORKER_AUTO_SCALE applied; RouteError naming an `ordered=True` route it
    would spread over several workers (core.runtime.ordering)."""
    plan = plan_workers(shared, workers, available_cpus())
    most = None
    if settings.worker_auto_scale and plan.count:
        policy = ScalePolicy.from_settings(settings, available_cpus())
        plan, most = autoscale_plan(plan, policy), policy.max_count
    check_ordered_routes(shared, ordered_route_processes(plan, most))
    return plan


def settings_overrides(settings: Settings, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings that differ from what a worker would read from the environment it inherits."""
    try:
        from_env = load_settings(os.environ if env is None else env)
    except Exception:  # the supervisor's settings came from elsewhere: pass them all
        return {name: getattr(settings, name) for name in SETTING_NAMES}
    return {name: getattr(settings, name) for name in SETTING_NAMES if getattr(settings, name) != getattr(from_env, name)}
