"""Rate limiting middleware: per route or group, optionally per value of a route parameter.

```python
from core.integrations.rate_limit import RateLimit

# at most 10 messages per second per device, bursts of up to 20, in this process's memory
router.on("devices/{device_id}/telemetry", Telemetry.store, middleware=[RateLimit(10, key="device_id", burst=20)])

# at most 100 per minute per device over all worker processes, counted in Redis
router.on("devices/{device_id}/alarm", Alarm.raise_, shared=True,
          middleware=[RateLimit(100, per=60, key="device_id", backend="redis")])
```

- `backend="memory"`: a token bucket per key in this process (each worker has its own buckets):
  `limit / per` tokens per second, holding at most `burst` (default `limit`).
- `backend="redis"`: a sliding window log in Redis shared by every process: at most `limit`
  messages in any `per` seconds. Times come from the Redis server's clock, so workers on hosts
  with skewed clocks agree. It uses the application's Redis (`REDIS_URL`), so it needs
  `ENABLE_REDIS=true`: `check_rate_limits` fails at startup, naming the route, when Redis is
  disabled. `redis_url=` points one limiter at another Redis.
- Redis unreachable at run time (or slower than `redis_timeout`): `on_redis_error="allow"` (the
  default) lets the message through unchecked (fail open: a limiter outage does not become a
  service outage); `"reject"` dead-letters it with error type `RateLimitUnavailable` (fail closed,
  nothing is silently lost). Either way it is counted (`redis_errors`) and logged at WARNING, at
  most every 10 s, and once when Redis answers again.
- `key`: the route parameter whose value gets its own limit (none: one limit for the route).
- Over the limit: `on_limit="dead_letter"` (default) sends the message to the dead-letter topic
  with error type `RateLimited`; `on_limit="drop"` acknowledges and discards it. Both are counted
  per route (`counters()`, exported as `mqtt_app_rate_limited_total`).
- Limits are per route unless `name=` is given: routes sharing one instance with a `name` (e.g. a
  group's middleware) share its limit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from core.runtime.dispatcher import DeadLetter
from core.routing.middleware import BaseMiddleware, CallNext
from core.routing.router import RouteError

if TYPE_CHECKING:
    from core.foundation.config import Settings
    from core.routing.context import MessageContext
    from core.routing.router import Route

log = logging.getLogger("core.rate_limit")

ON_LIMIT = ("dead_letter", "drop")
BACKENDS = ("memory", "redis")
ON_REDIS_ERROR = ("allow", "reject")
ERROR_LOG_INTERVAL = 10.0  # seconds between two warnings about the same unreachable Redis
# `Services.extras` key of the process's Redis client (core.integrations.streams.REDIS_KEY; not imported, so that
# the rate limiter does not load the streams machinery).
REDIS_KEY = "redis"


class RateLimited(DeadLetter):
    """Raised (and so dead-lettered) when a message is over its rate limit."""


class RateLimitUnavailable(DeadLetter):
    """Raised with `on_redis_error="reject"` when Redis could not be asked (so the message is dead-lettered)."""


class RedisNotEnabled(RuntimeError):
    """A Redis rate limit ran in a process without the application's Redis client (ENABLE_REDIS is off)."""


def safe_redis_url(url: str) -> str:
    """`url` without its password, for messages and readiness check names."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def redis_rate_limits(routes: Iterable["Route"]) -> list[tuple["Route", "RateLimit"]]:
    """(route, limiter) for every `RateLimit(backend="redis")` in the routes' middleware."""
    return [(route, mw) for route in routes for mw in route.middleware
            if isinstance(mw, RateLimit) and mw.backend == "redis"]


def check_rate_limits(routes: Iterable["Route"], settings: "Settings") -> None:
    """At startup: RouteError naming the route when a Redis rate limit cannot work with these settings."""
    for route, limiter in redis_rate_limits(routes):
        if not settings.enable_redis:
            raise RouteError(
                f"{route.describe()} uses {limiter!r}, but Redis is disabled: set ENABLE_REDIS=true (and REDIS_URL, "
                f"default {type(settings).redis_url}), or use backend='memory'"
            )


class TokenBuckets:
    """Token buckets by key: `rate` tokens per second, at most `capacity` stored."""

    def __init__(self, rate: float, capacity: float, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("rate must be positive and capacity at least 1")
        self.rate = rate
        self.capacity = capacity
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, time of last update]
        self._prune_at = max_keys

    def allow(self, key: str) -> bool:
        """Take one token for `key` if there is one."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
            self._buckets[key] = [self.capacity - 1, now]
            return True
        tokens = min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return True
        bucket[0] = tokens
        return False

    def _prune(self, now: float) -> None:
        # A bucket that has refilled completely is the same as a new one: forgetting it changes nothing.
        full = [k for k, (tokens, last) in self._buckets.items() if tokens + (now - last) * self.rate >= self.capacity]
        for key in full:
            del self._buckets[key]
        # When most keys are active, prune again only after the table doubled (not on every new key).
        self._prune_at = max(self.max_keys, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)


# Sliding window log: one sorted set per key, scores in milliseconds of the Redis server's clock
# (13 digits, exact in Lua's number formatting).
_SLIDING_WINDOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window + 1000)
  return 1
end
return 0
"""


class RedisSlidingWindow:
    """At most `limit` hits per key in any `window` seconds, shared through Redis.

    `allow(key, redis)` runs on the client given (the process's, from the application settings);
    without one, on a client of its own for `url`, created in the process (and event loop) that
    first uses it, so an instance built at import time in a router module is safe under spawn.
    """

    def __init__(self, limit: int, window: float, *, url: str | None = None, prefix: str = "ratelimit") -> None:
        self.limit = limit
        self.window_ms = max(1, int(window * 1000))
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scripts: tuple[Any, Any] | None = None  # (client, script registered on it)
        self._pid = 0
        self._member_prefix = ""
        self._counter = itertools.count()

    def _own_client(self) -> Any:
        if self.url is None:
            raise RedisNotEnabled("no Redis client given and no redis_url")
        if self._client is None or self._loop is not asyncio.get_running_loop():
            import redis.asyncio as redis_asyncio

            self._client = redis_asyncio.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
            self._loop = asyncio.get_running_loop()
        return self._client

    async def allow(self, key: str, redis: Any = None) -> bool:
        if self._pid != os.getpid():  # a new process (fork/spawn): its own members and client
            self._pid = os.getpid()
            self._member_prefix = uuid.uuid4().hex[:12]
            self._client = None
            self._scripts = None
        client = redis if redis is not None else self._own_client()
        if self._scripts is None or self._scripts[0] is not client:
            self._scripts = (client, client.register_script(_SLIDING_WINDOW_LUA))
        member = f"{self._member_prefix}:{next(self._counter)}"
        result = await self._scripts[1](keys=[f"{self.prefix}:{key}"], args=[self.limit, self.window_ms, member])
        return bool(result)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class RateLimit(BaseMiddleware):
    """Middleware that lets at most `limit` messages per `per` seconds through (see module doc)."""

    def __init__(
        self,
        limit: int,
        per: float = 1.0,
        *,
        key: str | None = None,
        burst: int | None = None,
        backend: str = "memory",
        on_limit: str = "dead_letter",
        name: str | None = None,
        redis_url: str | None = None,
        redis_prefix: str = "ratelimit",
        on_redis_error: str = "allow",
        redis_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"RateLimit: limit must be a whole number >= 1, not {limit!r}")
        if not isinstance(per, (int, float)) or per <= 0:
            raise ValueError(f"RateLimit: per must be a positive number of seconds, not {per!r}")
        if backend not in BACKENDS:
            raise ValueError(f"RateLimit: backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if on_limit not in ON_LIMIT:
            raise ValueError(f"RateLimit: on_limit must be one of {', '.join(ON_LIMIT)}, not {on_limit!r}")
        if on_redis_error not in ON_REDIS_ERROR:
            raise ValueError(f"RateLimit: on_redis_error must be one of {', '.join(ON_REDIS_ERROR)}, not {on_redis_error!r}")
        if not isinstance(redis_timeout, (int, float)) or redis_timeout <= 0:
            raise ValueError(f"RateLimit: redis_timeout must be a positive number of seconds, not {redis_timeout!r}")
        if burst is not None and (backend == "redis" or burst < 1):
            raise ValueError("RateLimit: burst is for backend='memory' and must be >= 1 (the Redis window allows `limit` per window)")
        self.limit = limit
        self.per = float(per)
        self.key = key
        self.backend = backend
        self.on_limit = on_limit
        self.on_redis_error = on_redis_error
        self.redis_timeout = float(redis_timeout)
        self.redis_url = redis_url
        self.name = name
        self._buckets = TokenBuckets(limit / per, burst or limit, clock=clock) if backend == "memory" else None
        self._window = RedisSlidingWindow(limit, per, url=redis_url, prefix=redis_prefix) if backend == "redis" else None
        self.limited: dict[str, int] = {}  # route pattern -> messages over the limit
        self.redis_errors = 0  # messages whose limit could not be checked (allowed or rejected per on_redis_error)
        self._last_error_log = -ERROR_LOG_INTERVAL
        self._redis_down = False

    def bucket_key(self, context: "MessageContext") -> str:
        scope = self.name or context.route.pattern
        if self.key is None:
            return scope
        try:
            value = context.params[self.key]
        except KeyError:
            raise LookupError(
                f"RateLimit(key={self.key!r}) on route {context.route.pattern!r}: the route has no parameter "
                f"{self.key!r} (it has: {', '.join(context.route.params) or 'none'})"
            ) from None
        return f"{scope}|{value}"

    async def handle(self, context: "MessageContext", call_next: CallNext) -> Any:
        key = self.bucket_key(context)
        if self._buckets is not None:
            allowed = self._buckets.allow(key)
        else:
            allowed = await self._allow_redis(key, context)
        if allowed:
            return await call_next(context)
        pattern = context.route.pattern
        self.limited[pattern] = self.limited.get(pattern, 0) + 1
        if self.on_limit == "drop":
            return None
        what = f" for {self.key}={context.params.get(self.key, '')!r}" if self.key else ""
        raise RateLimited(f"rate limit of {self.limit} per {self.per:g} s exceeded{what}")

    def _redis_client(self, context: "MessageContext") -> Any:
        """The process's Redis client (built from REDIS_URL when ENABLE_REDIS is on), or None for redis_url=."""
        if self.redis_url is not None:
            return None
        client = context.services.extras.get(REDIS_KEY)
        if client is None:
            raise RedisNotEnabled(
                f"{context.route.describe()} uses {self!r}, but this process has no Redis connection: set "
                "ENABLE_REDIS=true (and REDIS_URL)"
            )
        return client

    async def _allow_redis(self, key: str, context: "MessageContext") -> bool:
        assert self._window is not None
        client = self._redis_client(context)
        try:
            allowed = await asyncio.wait_for(self._window.allow(key, client), self.redis_timeout)
        except Exception as exc:
            return self._on_redis_failure(exc, context)
        if self._redis_down:
            self._redis_down = False
            log.warning("rate limit %s: Redis answers again; limiting (%d message(s) went unchecked or rejected)",
                        self._label(context), self.redis_errors)
        return allowed

    def _on_redis_failure(self, exc: Exception, context: "MessageContext") -> bool:
        self.redis_errors += 1
        self._redis_down = True
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            what = "letting messages through unchecked" if self.on_redis_error == "allow" else \
                "dead-lettering messages as RateLimitUnavailable"
            log.warning("rate limit %s: Redis unavailable (%s); %s (on_redis_error=%r, %d so far)",
                        self._label(context), reason, what, self.on_redis_error, self.redis_errors)
        if self.on_redis_error == "allow":
            return True
        raise RateLimitUnavailable(f"rate limit could not be checked, Redis unavailable ({reason}); "
                                   "on_redis_error='reject'")

    def _label(self, context: "MessageContext") -> str:
        return repr(self.name or context.route.pattern)

    def counters(self) -> dict[str, Any]:
        """What the metrics export: messages over the limit per route, and the action taken."""
        return {"action": self.on_limit, "limited": dict(self.limited), "redis_errors": self.redis_errors,
                "on_redis_error": self.on_redis_error}

    def __repr__(self) -> str:
        key = f", key={self.key!r}" if self.key else ""
        return f"RateLimit({self.limit}, per={self.per:g}{key}, backend={self.backend!r}, on_limit={self.on_limit!r})"
