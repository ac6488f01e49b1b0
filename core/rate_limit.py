"""Rate limiting middleware: per route or group, optionally per value of a route parameter.

```python
from core.rate_limit import RateLimit

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
  with skewed clocks agree. If Redis cannot be reached the message is let through (fail open),
  logged at most every 10 s and counted as `redis_errors`.
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
from typing import TYPE_CHECKING, Any, Callable

from core.dispatcher import DeadLetter
from core.middleware import BaseMiddleware, CallNext

if TYPE_CHECKING:
    from core.context import MessageContext

log = logging.getLogger("core.rate_limit")

ON_LIMIT = ("dead_letter", "drop")
BACKENDS = ("memory", "redis")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class RateLimited(DeadLetter):
    """Raised (and so dead-lettered) when a message is over its rate limit."""


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

    The Redis client is created in the process (and event loop) that first uses it, so an instance
    built at import time in a router module is safe under the spawn start method.
    """

    def __init__(self, limit: int, window: float, *, url: str | None = None, prefix: str = "ratelimit") -> None:
        self.limit = limit
        self.window_ms = max(1, int(window * 1000))
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        self._member_prefix = ""
        self._counter = itertools.count()

    def _connect(self) -> None:
        import redis.asyncio as redis_asyncio

        url = self.url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
        self._client = redis_asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._script = self._client.register_script(_SLIDING_WINDOW_LUA)
        self._loop = asyncio.get_running_loop()
        self._pid = os.getpid()
        self._member_prefix = uuid.uuid4().hex[:12]

    async def allow(self, key: str) -> bool:
        if self._client is None or self._pid != os.getpid() or self._loop is not asyncio.get_running_loop():
            self._connect()
        member = f"{self._member_prefix}:{next(self._counter)}"
        result = await self._script(keys=[f"{self.prefix}:{key}"], args=[self.limit, self.window_ms, member])
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
        if burst is not None and (backend == "redis" or burst < 1):
            raise ValueError("RateLimit: burst is for backend='memory' and must be >= 1 (the Redis window allows `limit` per window)")
        self.limit = limit
        self.per = float(per)
        self.key = key
        self.backend = backend
        self.on_limit = on_limit
        self.name = name
        self._buckets = TokenBuckets(limit / per, burst or limit, clock=clock) if backend == "memory" else None
        self._window = RedisSlidingWindow(limit, per, url=redis_url, prefix=redis_prefix) if backend == "redis" else None
        self.limited: dict[str, int] = {}  # route pattern -> messages over the limit
        self.redis_errors = 0
        self._last_error_log = 0.0

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
            allowed = await self._allow_redis(key)
        if allowed:
            return await call_next(context)
        pattern = context.route.pattern
        self.limited[pattern] = self.limited.get(pattern, 0) + 1
        if self.on_limit == "drop":
            return None
        what = f" for {self.key}={context.params.get(self.key, '')!r}" if self.key else ""
        raise RateLimited(f"rate limit of {self.limit} per {self.per:g} s exceeded{what}")

    async def _allow_redis(self, key: str) -> bool:
        assert self._window is not None
        try:
            return await self._window.allow(key)
        except Exception as exc:  # Redis down: let the message through rather than lose it
            self.redis_errors += 1
            now = time.monotonic()
            if now - self._last_error_log >= 10:
                self._last_error_log = now
                log.warning("rate limit: Redis unavailable (%s: %s); letting messages through (%d so far)",
                            type(exc).__name__, exc, self.redis_errors)
            return True

    def counters(self) -> dict[str, Any]:
        """What the metrics export: messages over the limit per route, and the action taken."""
        return {"action": self.on_limit, "limited": dict(self.limited), "redis_errors": self.redis_errors}

    def __repr__(self) -> str:
        key = f", key={self.key!r}" if self.key else ""
        return f"RateLimit({self.limit}, per={self.per:g}{key}, backend={self.backend!r}, on_limit={self.on_limit!r})"
