"""Pure parts of the worker manager: process count, route choice, exits, recycling limits."""

from __future__ import annotations

import pickle
import signal

import pytest

from core.foundation.config import load_settings
from core.router import Router
from core.processes.worker import (
    HandlerWatch,
    WorkerSpec,
    client_id_for,
    heartbeat_interval,
    recycle_reason,
    select_routes,
)
from core.worker_manager import _settings_overrides, describe_exit, plan_workers


async def handler(x: str) -> None:
    return None


def routes(*counts: int, plain: int = 0) -> list:
    router = Router()
    for i, count in enumerate(counts):
        router.on(f"shared{i}/{{x}}", handler, shared=True, worker_count=count)
    for i in range(plain):
        router.on(f"plain{i}/{{x}}", handler)
    return [r for r in router.routes if r.shared]


def test_explicit_count_puts_every_shared_route_on_every_worker() -> None:
    shared = routes(1, 3)
    plan = plan_workers(shared, 4, cpus=2)
    assert (plan.count, plan.all_routes) == (4, True)
    assert [len(select_routes(shared, i, plan.all_routes)) for i in range(4)] == [2, 2, 2, 2]


def test_without_a_number_the_largest_worker_count_decides() -> None:
    shared = routes(1, 3, 2)
    plan = plan_workers(shared, None, cpus=8)
    assert (plan.count, plan.all_routes) == (3, False)
    per_worker = [[r.pattern for r in select_routes(shared, i, plan.all_routes)] for i in range(plan.count)]
    assert per_worker == [
        ["shared0/{x}", "shared1/{x}", "shared2/{x}"],
        ["shared1/{x}", "shared2/{x}"],
        ["shared1/{x}"],
    ]
    # each route has exactly its worker_count subscribers
    for route in shared:
        assert sum(route in select_routes(shared, i, False) for i in range(plan.count)) == route.worker_count


def test_without_a_number_and_no_worker_count_one_worker_per_cpu() -> None:
    plan = plan_workers(routes(1, 1), None, cpus=6)
    assert (plan.count, plan.all_routes) == (6, True)
    assert "CPU" in plan.reason


def test_no_shared_routes_means_no_worker_processes() -> None:
    assert plan_workers([], 4, cpus=2).count == 0
    assert plan_workers([], None, cpus=2).count == 0


def test_a_worker_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        plan_workers(routes(1), 0, cpus=2)


def test_client_ids_are_stable_per_index() -> None:
    assert client_id_for("app-host", 0) == "app-host-w0"
    assert client_id_for("app-host", 12) == "app-host-w12"


def test_exits_are_described_for_the_log() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(None) == "still running"


def test_recycle_reason_by_messages_and_memory() -> None:
    mb = 2**20
    assert recycle_reason(99, 500 * mb, 100, 0) is None
    assert "WORKER_MAX_MESSAGES=100" in (recycle_reason(100, None, 100, 0) or "")
    assert recycle_reason(10, 100 * mb, 0, 200) is None
    assert "WORKER_MAX_MEMORY_MB=200" in (recycle_reason(10, 201 * mb, 0, 200) or "")
    # memory is only checked when measured, and once the worker has taken a message
    assert recycle_reason(10, None, 0, 200) is None
    assert recycle_reason(0, 900 * mb, 0, 200) is None
    assert recycle_reason(10**9, 10**12, 0, 0) is None


def test_heartbeat_interval_is_a_fraction_of_the_timeout_and_at_most_a_second() -> None:
    assert heartbeat_interval(30) == 1.0
    assert heartbeat_interval(2) == pytest.approx(0.4)
    assert heartbeat_interval(0.01) == 0.05


def test_workers_get_only_the_settings_the_environment_does_not_give_them() -> None:
    env = {"MQTT_BROKER": "127.0.0.1", "MQTT_CLIENT_ID": "x", "LOG_LEVEL": "info"}
    settings = load_settings(env).with_overrides(log_level="DEBUG", embedded_broker_port=11883)
    assert _settings_overrides(settings, env) == {"log_level": "DEBUG", "embedded_broker_port": 11883}
    assert _settings_overrides(load_settings(env), env) == {}


def test_worker_spec_crosses_the_process_boundary_as_plain_data() -> None:
    spec = WorkerSpec(2, False, {"log_level": "DEBUG"}, test_mode=True, wait_for_go=True)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert spec.worker_id == "w2"


async def test_handler_watch_reports_the_oldest_task_and_forgets_finished_ones() -> None:
    import asyncio

    gate = asyncio.Event()

    async def _run(endpoint: object, topic: str) -> None:  # shaped like Dispatcher._run
        await gate.wait()

    class Endpoint:
        pattern = "devices/{id}/status"

    watch = HandlerWatch()
    assert watch.oldest(set(), 10.0) is None
    first = asyncio.create_task(_run(Endpoint(), "devices/7/status"))
    await asyncio.sleep(0)
    tasks = {first}
    assert watch.oldest(tasks, 10.0) == {"age": 0.0, "route": "devices/{id}/status", "topic": "devices/7/status"}
    second = asyncio.create_task(_run(None, "other"))
    tasks.add(second)
    assert watch.oldest(tasks, 14.5) == {"age": 4.5, "route": "devices/{id}/status", "topic": "devices/7/status"}
    tasks.discard(first)
    assert watch.oldest(tasks, 20.0) == {"age": 5.5, "route": "?", "topic": "other"}
    gate.set()
    await asyncio.gather(first, second)
