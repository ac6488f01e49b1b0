"""A program that runs two regional worker groups with the seed's API (tests/integration/test_worker_api.py).

`python -m tests.support.regional_app GROUP [GROUP ...]`: one `WorkerManager` per group over the
routers of REGIONAL_ROUTERS, two workers each; prints `shared routes: <json>` and `ready` once every
worker is subscribed, then serves until SIGTERM and exits with the worst exit code of the managers.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from bootstrap.app import discover_routers
from core.foundation.logging_setup import setup_logging
from core.router import merge_routers
from core.worker_manager import WorkerManager


def main(groups: list[str]) -> int:
    setup_logging("INFO", "text", "main")
    package = os.environ["REGIONAL_ROUTERS"]
    router = merge_routers(discover_routers(package))
    managers = [WorkerManager(router=router, group_name=group, router_directory=package) for group in groups]
    print("shared routes:", json.dumps(managers[0].get_shared_routes_info()), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    for manager in managers:
        manager.start_workers(num_workers=2)
    if all(manager.wait_ready(60) for manager in managers):
        print("ready", flush=True)
    stop.wait()
    codes = [manager.stop_workers(timeout=60) for manager in managers]
    print("exit codes:", codes, flush=True)
    return max(1 if code is None else code for code in codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
