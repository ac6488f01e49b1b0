"""Shared pytest fixtures: private brokers and unique names.

Tests that use a server fixture (or live under tests/integration) are marked
``integration`` automatically, so ``pytest -m "not integration"`` runs only
the pure tests.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.servers import (  # noqa: E402
    MOSQUITTO_BIN,
    REDIS_BIN,
    MosquittoServer,
    RedisServer,
    require_server_binary,
)

SERVER_FIXTURES = {
    "mosquitto",
    "mosquitto_factory",
    "redis_server",
    "redis_factory",
}

# The session broker queues up to this many messages per offline client, so
# tests of large batches are not cut short by mosquitto's default of 1000.
SESSION_BROKER_MAX_QUEUED = 100_000


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration_dir = ROOT / "tests" / "integration"
    for item in items:
        uses_server = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses_server or integration_dir in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


def _require(binary: str) -> None:
    if binary == MOSQUITTO_BIN:
        require_server_binary(binary, "mosquitto", "MOSQUITTO_BIN")
    else:
        require_server_binary(binary, "redis-server", "REDIS_SERVER_BIN")


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoServer]:
    """One private mosquitto for the whole session (no persistence).

    Shared by many tests: use ``unique_id`` in client ids and topics. Tests
    that stop, kill or restart a broker must use ``mosquitto_factory``.
    """
    _require(MOSQUITTO_BIN)
    server = MosquittoServer(max_queued=SESSION_BROKER_MAX_QUEUED)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def mosquitto_factory() -> Iterator[Callable[..., MosquittoServer]]:
    """Start extra private brokers: ``mosquitto_factory(persistence=True)``.

    Takes MosquittoServer's arguments; every broker started is stopped and
    its directory removed at teardown.
    """
    _require(MOSQUITTO_BIN)
    servers: list[MosquittoServer] = []

    def make(*args: Any, **kwargs: Any) -> MosquittoServer:
        server = MosquittoServer(*args, **kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
            server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the whole session (nothing persisted).

    Shared by many tests: use ``unique_id`` in key and stream names.
    """
    _require(REDIS_BIN)
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start extra private redis servers: ``redis_factory(appendonly=True)``."""
    _require(REDIS_BIN)
    servers: list[RedisServer] = []

    def make(*args: Any, **kwargs: Any) -> RedisServer:
        server = RedisServer(*args, **kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
            server.cleanup()


@pytest.fixture
def unique_id() -> str:
    """A short unique string for client ids, topics and keys."""
    return "t" + uuid.uuid4().hex[:10]
