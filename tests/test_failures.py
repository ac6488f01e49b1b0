"""core.foundation.failures (transient or not), core.runtime.breaker (the circuit breaker) and core.foundation.error_log (bounded logs)."""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
from typing import Any

import pytest

from core.runtime.breaker import CLOSED, HALF_OPEN, OPEN, BreakerStopped, CircuitBreaker
from core.foundation.error_log import ErrorLog
from core.foundation.failures import DeadLetter, is_transient


def _sa(cls_name: str, orig: BaseException, invalidated: bool = False) -> BaseException:
    import sqlalchemy.exc as sa_exc

    return getattr(sa_exc, cls_name)("SELECT 1", {}, orig, connection_invalidated=invalidated)


def _wrapped(driver_error: BaseException) -> BaseException:
    """As SQLAlchemy's asyncpg adapter raises it: its own `Error` raised from the driver's, wrapped in a DBAPIError."""
    import sqlalchemy.exc as sa_exc

    adapter_error = Exception(str(driver_error))
    adapter_error.__cause__ = driver_error
    return sa_exc.DBAPIError("connect", {}, adapter_error)


def transient_errors() -> list[BaseException]:
    import asyncpg.exceptions as pg
    import pymysql.err as my
    import redis.exceptions as rx
    import sqlalchemy.exc as sa_exc

    return [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"), ConnectionResetError(), BrokenPipeError(),
        TimeoutError(), asyncio.TimeoutError(), OSError(errno.EHOSTUNREACH, "no route to host"),
        OSError("Multiple exceptions: [Errno 111] ..., [Errno 99] ..."),
        _sa("OperationalError", Exception("server closed the connection unexpectedly")),
        _sa("InterfaceError", Exception("connection is closed")),
        sa_exc.DisconnectionError("pool pre-ping failed"),
        sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out"),
        _sa("DBAPIError", Exception("connection was closed in the middle of operation"), invalidated=True),
        _sa("OperationalError", sqlite3.OperationalError("database is locked")),
        pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        _wrapped(pg.ConnectionDoesNotExistError("connection was closed in the middle of operation")),
        pg.CannotConnectNowError("the database system is starting up"), pg.TooManyConnectionsError("too many"),
        pg.AdminShutdownError("terminating connection due to administrator command"),
        my.OperationalError(2003, "Can't connect to MySQL server"), my.OperationalError(2013, "Lost connection"),
        my.InterfaceError(0, ""),
        rx.ConnectionError("Error 111 connecting"), rx.TimeoutError("Timeout reading from socket"),
        rx.ReadOnlyError("You can't write against a read only replica."), rx.ResponseError("LOADING Redis is loading"),
    ]


def permanent_errors() -> list[BaseException]:
    import pymysql.err as my
    import sqlalchemy.exc as sa_exc

    return [
        ValueError("bad order"), KeyError("id"), ZeroDivisionError(), RuntimeError("first line\nsecond line"),
        FileNotFoundError(errno.ENOENT, "no such file"), PermissionError(errno.EACCES, "denied"),
        DeadLetter("rejected"),
        _sa("IntegrityError", Exception("duplicate key value violates unique constraint")),
        _sa("ProgrammingError", Exception('relation "orders" does not exist')),
        _sa("DBAPIError", Exception("invalid input syntax for type integer")),
        _wrapped(ValueError("invalid input for query argument $1")),
        _sa("OperationalError", sqlite3.OperationalError("no such table: orders")),  # a bug, not an outage
        sa_exc.NoResultFound("No row was found"),
        my.OperationalError(1054, "Unknown column"),
    ]


@pytest.mark.parametrize("exc", transient_errors(), ids=lambda e: f"{type(e).__module__}.{type(e).__name__}")
def test_errors_meaning_a_dependency_is_down_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", permanent_errors(), ids=lambda e: f"{type(e).__module__}.{type(e).__name__}")
def test_errors_of_the_message_or_the_code_are_not(exc: BaseException) -> None:
    assert not is_transient(exc)


# -- the circuit breaker ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_breaker_opens_after_the_threshold_and_lets_one_probe_through_when_half_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 1.0, 8.0, rand=lambda: 1.0, clock=clock)
    assert not breaker.record_failure() and not breaker.record_failure() and breaker.state == CLOSED
    assert breaker.record_failure() and breaker.state == OPEN  # third in a row
    waiters = [asyncio.create_task(breaker.admit()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)  # open: nobody calls
    clock.now += 1.0  # the first probe delay (1 s with rand=1)
    breaker._notify()  # wake the waiters so they look at the (fake) clock
    await asyncio.sleep(0)
    assert breaker.state == HALF_OPEN and sum(w.done() for w in waiters) == 1  # exactly one probe
    assert not breaker.record_failure() and breaker.state == OPEN  # the probe failed: open again, longer
    clock.now += 1.0
    breaker._notify()
    await asyncio.sleep(0)
    assert sum(w.done() for w in waiters) == 1  # the second delay is 2 s
    clock.now += 1.0
    breaker._notify()
    await asyncio.sleep(0)
    assert breaker.state == HALF_OPEN and sum(w.done() for w in waiters) == 2
    assert breaker.record_success() and breaker.state == CLOSED
    await asyncio.sleep(0)
    assert all(w.done() for w in waiters)  # closed: every waiter goes
    assert breaker.opened == 1


async def test_a_success_resets_the_count_of_failures_in_a_row() -> None:
    breaker = CircuitBreaker(2)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == CLOSED


async def test_stopping_the_breaker_wakes_its_waiters() -> None:
    breaker = CircuitBreaker(1, 60.0, 60.0)
    breaker.record_failure()
    waiter = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0)
    breaker.stop()
    with pytest.raises(BreakerStopped):
        await waiter


async def test_an_abandoned_probe_lets_the_next_waiter_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, 1.0, rand=lambda: 1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    await breaker.admit()
    assert breaker.state == HALF_OPEN
    other = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0)
    assert not other.done()
    breaker.record_abandoned()
    await asyncio.sleep(0)
    assert other.done() and breaker.state == HALF_OPEN


# -- bounded logs -----------------------------------------------------------------------------------


def test_error_log_logs_once_per_interval_per_key_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    errors = ErrorLog(logging.getLogger("test.errors"), 60.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="test.errors")
    try:
        raise ConnectionResetError("gone")
    except ConnectionResetError as exc:
        error = exc
    for _ in range(100):
        errors.log(("route", ConnectionResetError), logging.WARNING, "route %r failed", "a", exc=error)
    errors.log(("other", ConnectionResetError), logging.WARNING, "route %r failed", "b", exc=error)
    assert [r.getMessage() for r in caplog.records] == ["route 'a' failed", "route 'b' failed"]
    assert all(r.exc_info for r in caplog.records)
    clock.now += 60.0
    errors.log(("route", ConnectionResetError), logging.WARNING, "route %r failed", "a", exc=error)
    assert caplog.records[-1].getMessage() == ("route 'a' failed [99 more like this in the last 60 s were not "
                                               "logged]")


def test_try_admit_is_admit_without_waiting() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 5.0, 5.0, rand=lambda: 1.0, clock=clock)
    assert breaker.try_admit()
    breaker.record_failure()
    assert not breaker.try_admit()
    breaker.probe_now()
    assert breaker.try_admit() and breaker.state == HALF_OPEN
    assert not breaker.try_admit()  # one probe at a time


# -- holding across processes (what --workers shows) ---------------------------------------------------


def test_holding_is_summed_over_processes_and_the_most_open_breaker_is_shown() -> None:
    import os

    from prometheus_client.parser import text_string_to_metric_families

    from core.operations.metrics import Aggregator, ProcessInfo, SystemSample, render_metrics

    def worker(name: str, pid: int, holding: dict[str, Any], held: int) -> ProcessInfo:
        stats = {"routes": {"orders/{n}": {"handled": 1, "failed": 0, "dead_lettered": 0, "seconds": 0.1,
                                           "retried": held, "held": held}},
                 "holding": holding}
        return ProcessInfo(name, "worker", pid, "running", True, True, stats=stats)

    class Source:
        processes = [worker("w0", 10, {"orders/{n}": {"holding": 7, "breaker": "open"}}, 9),
                     worker("w1", 11, {"orders/{n}": {"holding": 3, "breaker": "half_open"}}, 4)]

        def sample(self) -> SystemSample:
            return SystemSample("workers", os.getpid(), 1.0, False, None, self.processes)

    source = Source()
    aggregator = Aggregator(source)
    body, _ = render_metrics(aggregator)
    samples = {(s.name, tuple(s.labels.items())): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    route = (("route", "orders/{n}"),)
    assert samples[("mqtt_app_route_messages_holding", route)] == 10
    assert samples[("mqtt_app_route_circuit_open", route)] == 1
    assert samples[("mqtt_app_route_messages_held_total", route)] == 13
    assert samples[("mqtt_app_route_messages_retried_total", route)] == 13
    # The dependency is back in w0: its route leaves the holding extension; w1 still probes.
    source.processes[0] = worker("w0", 10, {}, 9)
    (view,) = [r for r in aggregator.collect().routes if r.pattern == "orders/{n}"]
    assert (view.holding, view.breaker) == (3, "half_open")
