"""Which errors mean "a dependency is down right now" (transient) rather than "this message is bad".

`is_transient(exc)` is the one place that decides it, for handlers (`core.runtime.retry`), the Redis
stream writer and consumers (`core.integrations.streams`) and the outbox. Transient errors are held and
retried with backoff, never dead-lettered:

- the network: connection refused, reset or aborted, broken pipe, timeouts, name resolution;
- SQLAlchemy: `OperationalError`, `InterfaceError`, `DisconnectionError`, a pool `TimeoutError`, and any `DBAPIError`
  whose connection was invalidated (except SQLite errors other than "locked"/"busy": a local
  file is never "down", so "no such table" is a bug, not an outage);
- asyncpg connection errors (class 08, "cannot connect now", server shutdown, too many
  connections) and aiomysql/PyMySQL connection errors (2002-2013, 2055, 1040, 1053, deadlocks);
- redis-py `ConnectionError` and `TimeoutError`, and the error replies of a server that cannot
  take writes for now (`READONLY`, `OOM`, `LOADING`, ...).

Optional libraries are imported lazily and only if installed, so this module costs nothing
when they are not used.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
from typing import Any, Awaitable, Callable

# Error replies meaning "this server cannot take writes right now", whatever the command: a replica
# during failover (READONLY), maxmemory with noeviction (OOM), a long script (BUSY), loading the
# dataset (LOADING), cluster resharding or outages, persistence failing (MISCONF), missing replicas.
TRANSIENT_REPLIES = frozenset({
    "READONLY", "OOM", "BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "MISCONF", "NOREPLICAS",
})

# MySQL/MariaDB client and server error codes that mean the server is (for now) out of reach.
MYSQL_TRANSIENT_CODES = frozenset({
    1040,  # too many connections
    1053,  # server shutdown in progress
    1205,  # lock wait timeout
    1213,  # deadlock, transaction rolled back
    2002, 2003, 2005, 2006, 2013,  # cannot connect / server gone away / lost connection during query
    2055,  # lost connection (system error)
})

class DeadLetter(Exception):
    """Raise from middleware or a handler to send the message to the dead-letter topic on purpose (no retries)."""


class RouteTimeout(Exception):
    """A handler ran past its route's `timeout=` (dead-lettered as error type `Timeout`; not transient)."""


async def call_with_timeout(chain: Callable[[Any], Awaitable[Any]], context: Any, timeout: float) -> Any:
    """`await chain(context)`, cancelled after `timeout` seconds with RouteTimeout.

    Only the route's deadline becomes a RouteTimeout; a TimeoutError the handler raised itself (a
    database or HTTP client timing out) stays a TimeoutError, which is transient.
    """
    deadline: asyncio.Timeout | None = None
    try:
        async with asyncio.timeout(timeout) as deadline:
            return await chain(context)
    except TimeoutError:
        if deadline is not None and deadline.expired():
            raise RouteTimeout(f"handler exceeded timeout={timeout} s") from None
        raise


_NETWORK: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.gaierror)
_NETWORK_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
})


def _loaded(module: str) -> Any:
    """The module if some code already imported it (an exception of it can only exist then)."""
    return sys.modules.get(module)


def is_unreachable(exc: BaseException) -> bool:
    """The connection failed (as opposed to a server answering with an error)."""
    if isinstance(exc, _NETWORK):
        return True
    redis_exceptions = _loaded("redis.exceptions")
    if redis_exceptions is not None and isinstance(exc, (redis_exceptions.ConnectionError,
                                                         redis_exceptions.TimeoutError)):
        return True
    if isinstance(exc, OSError):
        # Socket errors carry a network errno; file errors (ENOENT, EACCES, ...) are not outages. An OSError
        # without errno comes from networking code (asyncio reports failed connects to several addresses so).
        return exc.errno is None or exc.errno in _NETWORK_ERRNOS
    return False


def _redis_busy(exc: BaseException) -> bool:
    redis_exceptions = _loaded("redis.exceptions")
    if redis_exceptions is None or not isinstance(exc, redis_exceptions.ResponseError):
        return False
    known = tuple(getattr(redis_exceptions, name, ()) for name in ("ReadOnlyError", "OutOfMemoryError",
                                                                    "BusyLoadingError"))
    if isinstance(exc, tuple(t for t in known if isinstance(t, type))):
        return True
    code = getattr(exc, "status_code", None)  # set by redis-py for the replies it knows (OOM, READONLY, ...)
    if not code:
        text = str(exc.args[0]) if exc.args else ""
        code = text.split(" ", 1)[0]
    return code in TRANSIENT_REPLIES


def _sqlalchemy_transient(exc: BaseException) -> bool | None:
    """True/False for SQLAlchemy errors, None for anything else."""
    sa_exc = _loaded("sqlalchemy.exc")
    if sa_exc is None or not isinstance(exc, sa_exc.SQLAlchemyError):
        return None
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):  # TimeoutError: no pooled connection came free
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    orig = exc.orig
    if type(orig).__module__.startswith("sqlite3"):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    if exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    # SQLAlchemy's async adapters wrap the driver's exception in their own `Error` (raised `from` it).
    cause: BaseException | None = orig
    for _ in range(3):
        if cause is None or cause is exc:
            return False
        if _driver_transient(cause):
            return True
        cause = cause.__cause__
    return False


def _driver_transient(exc: BaseException) -> bool:
    asyncpg_exceptions = _loaded("asyncpg.exceptions")
    if asyncpg_exceptions is not None:
        if isinstance(exc, (asyncpg_exceptions.PostgresConnectionError, asyncpg_exceptions.CannotConnectNowError,
                            asyncpg_exceptions.AdminShutdownError, asyncpg_exceptions.CrashShutdownError,
                            asyncpg_exceptions.TooManyConnectionsError)):
            return True
        if isinstance(exc, asyncpg_exceptions.InterfaceError):
            text = str(exc).lower()
            return "connection" in text and "closed" in text
    pymysql_err = _loaded("pymysql.err")
    if pymysql_err is not None:
        if isinstance(exc, pymysql_err.InterfaceError):
            return True
        if isinstance(exc, pymysql_err.OperationalError):
            code = exc.args[0] if exc.args else None
            return code in MYSQL_TRANSIENT_CODES
    return False


def is_transient(exc: BaseException) -> bool:
    """A dependency cannot serve us now but will later: hold the work and retry it, do not dead-letter it."""
    if is_unreachable(exc) or _redis_busy(exc):
        return True
    verdict = _sqlalchemy_transient(exc)
    if verdict is not None:
        return verdict
    return _driver_transient(exc)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` (SQLAlchemy appends the statement and its parameters below)."""
    text = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:limit]}"
