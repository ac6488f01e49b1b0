"""The seed's `WorkerManager` API without processes: names, settings, route info, clear errors.

The processes themselves (two managers, two groups, on a real broker) are tested in
tests/integration/test_worker_api.py.
"""

from __future__ import annotations

import logging

import pytest

from core.foundation.config import ConfigError, load_settings
from core.router import Router
from core.processes.worker_api import _running
from core.worker_manager import WorkerManager

SETTINGS = load_settings({"MQTT_BROKER": "127.0.0.1", "MQTT_CLIENT_ID": "app", "MQTT_GROUP_NAME": "workers"})
PACKAGE = "tests.apps.seqapp.routers"


async def handler() -> None:
    return None


def test_the_seed_import_and_constructor() -> None:
    manager = WorkerManager(router=None, group_name="us_east_workers", router_directory=PACKAGE, settings=SETTINGS)
    assert (manager.group_name, manager.router_directory) == ("us_east_workers", PACKAGE)
    # Settings the worker processes get (as overrides): the group, the routers and a client id of the group.
    assert manager.settings.mqtt_group_name == "us_east_workers"
    assert manager.settings.routers_package == PACKAGE
    assert manager.settings.mqtt_client_id == "app-us_east_workers"
    assert WorkerManager(group_name="workers", router_directory=PACKAGE, settings=SETTINGS).settings.mqtt_client_id == "app"
    assert WorkerManager(group_name="eu", router_directory=PACKAGE, settings=SETTINGS,
                         client_id="eu-pod").settings.mqtt_client_id == "eu-pod"


def test_get_shared_routes_info_lists_the_shared_routes() -> None:
    router = Router()
    router.on("sensors/{sensor_id}/data", handler, qos=1, shared=True, worker_count=3)
    router.on("alerts/{device_id}", handler, qos=0)
    info = WorkerManager(router, group_name="production_workers", router_directory=PACKAGE,
                         settings=SETTINGS).get_shared_routes_info()
    assert info == [{"topic": "sensors/{sensor_id}/data", "mqtt_topic": "sensors/+/data",
                     "shared_topic": "$share/production_workers/sensors/+/data", "worker_count": 3, "qos": 1}]


def test_bad_group_name_is_named() -> None:
    with pytest.raises(ConfigError, match="group_name='a/b'"):
        WorkerManager(group_name="a/b", router_directory=PACKAGE, settings=SETTINGS)


def test_no_shared_routes_starts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()
    router.on("alerts/{device_id}", handler)
    manager = WorkerManager(router, group_name="g", router_directory=PACKAGE, settings=SETTINGS)
    with caplog.at_level(logging.INFO):
        manager.start_workers()
    assert "No shared routes found, skipping worker startup" in caplog.text
    assert not manager.running and manager.stop_workers() is None


def test_router_directory_must_hold_the_routers_shared_routes() -> None:
    router = Router()
    router.on("elsewhere/{x}", handler, qos=1, shared=True)
    manager = WorkerManager(router, group_name="g", router_directory=PACKAGE, settings=SETTINGS)
    with pytest.raises(ConfigError, match=r"router_directory='tests.apps.seqapp.routers' lacks shared route\(s\) elsewhere/\+"):
        manager.start_workers()


def test_two_running_managers_cannot_share_a_client_id_or_an_embedded_broker() -> None:
    first = WorkerManager(group_name="eu", router_directory=PACKAGE, settings=SETTINGS)
    _running[first.settings.mqtt_client_id] = first  # as start_workers() registers it
    try:
        with pytest.raises(ConfigError, match="already uses client id 'app-eu'"):
            WorkerManager(group_name="eu", router_directory=PACKAGE, settings=SETTINGS)._claim()
        embedded = load_settings({"MQTT_CLIENT_ID": "app"})
        one = WorkerManager(group_name="a", router_directory=PACKAGE, settings=embedded)
        one._claim()
        with pytest.raises(ConfigError, match="second embedded broker"):
            WorkerManager(group_name="b", router_directory=PACKAGE, settings=embedded)._claim()
    finally:
        _running.clear()


def test_an_ordered_shared_route_over_several_workers_is_refused_before_any_process_starts() -> None:
    from core.router import RouteError

    manager = WorkerManager(group_name="g", router_directory="tests.apps.ordered_app", settings=SETTINGS)
    with pytest.raises(RouteError, match="'ordered/{device_id}/status'.*ordered=True but would run in 2 worker"):
        manager.start_workers(num_workers=2)
    assert not manager.running
