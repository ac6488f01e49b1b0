"""The Redis side every part of `core.integrations.streams` shares: the process's client, its error classes, the
stream and dead-letter names, the reconnect backoff."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from core.foundation.backoff import backoff_delay
from core.foundation.config import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

REDIS_KEY = "redis"
"""`Services.extras[REDIS_KEY]`: the process's `redis.asyncio.Redis` client (when ENABLE_REDIS)."""
WRITER_KEY = "stream_writer"
"""`Services.extras[WRITER_KEY]`: the process's `StreamWriter`."""

DLQ_SUFFIX = ":dlq"
BLOCK_MS = 1000  # one XREADGROUP waits this long for entries; bounds how long a stop takes
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0
WRITE_BATCH = 500  # XADDs per pipeline


class StreamError(RuntimeError):
    """Redis refused to store this entry for a reason that retrying will not fix (e.g. WRONGTYPE)."""


def redis_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "Redis is not reachable right now" (retried with backoff, never fatal)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError)


def make_redis(settings: Settings) -> "Redis":
    """One client (with its connection pool) per process; built after the process started."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry as RedisRetry
    from redis.backoff import NoBackoff

    # One immediate retry replaces a pooled connection that died with a Redis restart; longer
    # outages are handled (and logged) by the callers' own backoff.
    return Redis.from_url(settings.redis_url, socket_timeout=BLOCK_MS / 1000 + 10, socket_connect_timeout=5,
                          retry=RedisRetry(NoBackoff(), 1), health_check_interval=30)


def reconnect_delay(failures: int) -> float:
    return backoff_delay(failures, RECONNECT_MIN, RECONNECT_MAX, random.random)
