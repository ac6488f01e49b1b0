"""Redis Streams: MQTT messages handed to a stream, consumer groups with retries and dead letters.

A stream route (`router.on("orders/{id}/placed", handler, stream="orders")`) has two halves:

- MQTT side (`bridge_call`, run by the Dispatcher in place of the handler): the message is
  appended to the stream by the process's `StreamWriter` (XADD with approximate MAXLEN,
  pipelined with whatever else is waiting). The Dispatcher acknowledges the MQTT message only
  after the XADD reply, so while Redis is away nothing is acknowledged and the broker keeps it.
- Stream side (`StreamConsumer`, one per stream in every process that serves the route): a
  consumer group (`MQTT_GROUP_NAME`, consumer = the process's MQTT client id, unique per replica) reads entries, runs the route's
  middleware and handler with the same arguments as an inline route, and XACKs after success.
  A failing entry is retried after `STREAM_RETRY_DELAY` (re-claimed with XCLAIM, which counts the
  delivery) up to `STREAM_MAX_RETRIES` times, then moved to `<stream>:dlq` and acknowledged.
  Entries left pending by a dead or hung consumer are taken over with XAUTOCLAIM once idle for
  `STREAM_CLAIM_IDLE_MS`.

`Router.stream(name, handler)` declares a consumer of a stream written by other systems: there is
no MQTT side, and the handler gets the entry's `payload` field (or all its fields as a dict).
Delivery is at least once: a handler may see an entry again after a crash or a Redis failover.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from core.foundation.config import Settings
from core.runtime.dispatcher import handler_call  # noqa: F401 - imported from here: stream handlers are called as inline ones
from core.foundation.failures import is_transient, is_unreachable  # noqa: F401 - also imported from here
from core.routing.router import Route, RouteError
from core.integrations.stream_consumer import ConsumerCounters, StreamConsumer  # noqa: F401 - also imported from here
from core.integrations.stream_entries import (StreamDelivery, StreamMessage, StreamProperties, decode_entry,  # noqa: F401
                                 encode_entry, entry_text)
from core.integrations.stream_recovery import original_fields  # noqa: F401
from core.integrations.stream_redis import (BLOCK_MS, DLQ_SUFFIX, REDIS_KEY, WRITER_KEY, StreamError, make_redis,  # noqa: F401
                               redis_errors)
from core.integrations.stream_writer import StreamWriter, bridge_call, stream_bridge  # noqa: F401

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from core.runtime.runtime import Runtime

log = logging.getLogger("core.streams")


def check_stream_routes(routes: Iterable[Route], settings: Settings) -> None:
    """RouteError naming the route if a stream route cannot work with these settings."""
    by_stream: dict[str, Route] = {}
    for route in routes:
        if route.stream is None:
            continue
        if not isinstance(route.stream, str) or not route.stream.strip() or route.stream.endswith(DLQ_SUFFIX):
            raise RouteError(f"{route.describe()}: stream={route.stream!r} must be a non-empty name not ending in "
                             f"{DLQ_SUFFIX!r} (that suffix is the dead-letter stream)")
        if not settings.enable_redis:
            raise RouteError(
                f"{route.describe()} uses the Redis stream {route.stream!r}, but Redis is disabled: set "
                f"ENABLE_REDIS=true (and REDIS_URL, default {Settings.redis_url}), or remove stream= from the route"
            )
        other = by_stream.setdefault(route.stream, route)
        if other.shared != route.shared:
            raise RouteError(
                f"{route.describe()} and {other.describe()} share the stream {route.stream!r} but not shared=: "
                "one consumer group serves a stream, so its routes must all run in the workers or all in the main process"
            )


# -- the hook ------------------------------------------------------------------------------------


class StreamsHook:
    """RuntimeHook (ENABLE_REDIS): the Redis client, the writer and the consumers of one process."""

    route_bridge = staticmethod(stream_bridge)  # the runtime's dispatcher appends stream routes' messages

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.redis: "Redis | None" = None
        self.writer: StreamWriter | None = None
        self.consumers: list[StreamConsumer] = []
        self._backlog_task: asyncio.Task[None] | None = None

    async def start(self, runtime: "Runtime") -> None:
        self.redis = make_redis(self.settings)
        self.writer = StreamWriter(self.redis, self.settings.stream_maxlen, f"streams[{self.worker_id}]")
        self.writer.start()
        extras = runtime.services.extras
        extras[REDIS_KEY] = self.redis
        extras[WRITER_KEY] = self.writer
        by_stream: dict[str, list[Route]] = defaultdict(list)
        for route in runtime.table.routes:
            if route.stream is not None:
                by_stream[route.stream].append(route)
        for stream, routes in by_stream.items():
            if not consumes(runtime, routes):
                continue
            consumer = StreamConsumer(self.redis, stream, routes, self.settings, runtime.services, runtime.stats,
                                      runtime.executor, consumer=runtime.client_id)
            consumer.start()
            self.consumers.append(consumer)
        if self.consumers:
            log.info("consuming stream(s) %s as %r in group %r", ", ".join(c.stream for c in self.consumers),
                     runtime.client_id, self.settings.mqtt_group_name)
        runtime.stats.extensions["streams"] = self.snapshot
        if self.consumers and self.settings.http_port is not None:  # only the ops server shows backlogs
            from core.runtime.process_metrics import start_backlog

            self._backlog_task = start_backlog(runtime.stats, "streams", self.backlog)

    def snapshot(self) -> dict[str, Any]:
        return {c.stream: vars(c.counters).copy() for c in self.consumers}

    async def backlog(self) -> dict[str, float]:
        """Per consumed stream: `stream:<name>` (entries not yet acknowledged by the group: lag + pending),
        `stream:<name>:pending` (delivered, not acknowledged) and `stream:<name>:dlq` (length of `<name>:dlq`)."""
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        for consumer in self.consumers:
            pipe.xinfo_groups(consumer.stream)
            pipe.xlen(consumer.dlq)
        replies = await pipe.execute(raise_on_error=False)
        out: dict[str, float] = {}
        for index, consumer in enumerate(self.consumers):
            groups, dlq = replies[2 * index], replies[2 * index + 1]
            if isinstance(groups, Exception) or isinstance(dlq, Exception):
                continue  # e.g. the stream does not exist (yet)
            for group in groups:
                if entry_text(group.get("name", b"")) != consumer.group:
                    continue
                pending = int(group.get("pending") or 0)
                lag = group.get("lag")  # None when Redis cannot tell (entries deleted in the middle); pre-7.0: absent
                out[f"stream:{consumer.stream}"] = pending + (int(lag) if lag is not None else 0)
                out[f"stream:{consumer.stream}:pending"] = pending
                out[f"stream:{consumer.stream}:dlq"] = int(dlq)
        return out

    async def stop(self, runtime: "Runtime") -> None:
        if self._backlog_task is not None:
            self._backlog_task.cancel()
            await asyncio.gather(self._backlog_task, return_exceptions=True)
        await asyncio.gather(*(consumer.stop() for consumer in self.consumers), return_exceptions=True)
        if self.writer is not None:
            await self.writer.stop()
        if self.redis is not None:
            await self.redis.aclose()
        runtime.services.extras.pop(WRITER_KEY, None)
        runtime.services.extras.pop(REDIS_KEY, None)


def consumes(runtime: "Runtime", routes: Sequence[Route]) -> bool:
    """Whether this process joins the consumer group of a stream with these routes.

    It does when it subscribes to one of the stream's routes on MQTT or the stream has
    consumer-only routes (`Router.stream`). A runtime that only drains a parked session (no
    subscriptions of its own) bridges what it receives but does not consume.
    """
    if any(not route.subscribe for route in routes):
        return True
    group = runtime.settings.mqtt_group_name
    subscribed = {sub.topic for sub in runtime.client.subscriptions}
    return any(route.subscription_topic(group) in subscribed for route in routes)


def streams_hooks(settings: Settings, worker_id: str) -> list[StreamsHook]:
    """Hook factory for `Application.hook_factories`."""
    return [StreamsHook(settings, worker_id)]
