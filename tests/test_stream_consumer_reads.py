"""How a stream consumer reads: acks ride with the next read; after a Redis failure it reads back its own pending entries."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.foundation.config import load_settings
from core.routing.context import MessageContext, Services
from core.router import Router
from core.runtime.stats import ProcessStats
from core.integrations.streams import StreamConsumer, encode_entry


class Pipeline:
    def __init__(self, redis: "FakeRedis") -> None:
        self.redis, self.commands = redis, []

    def xack(self, *args: Any) -> None:
        self.commands.append(("xack", args))

    def xreadgroup(self, *args: Any, **kwargs: Any) -> None:
        self.commands.append(("xreadgroup", args))

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.redis.round_trips.append([name for name, _ in self.commands])
        return [await getattr(self.redis, name)(*args, record=False) for name, args in self.commands]


class FakeRedis:
    """Serves the given batches of entries, then nothing; records each round trip's commands."""

    def __init__(self, batches: list[list[tuple[bytes, dict[bytes, Any]]]], lose_next_reply: bool = False) -> None:
        self.batches = batches
        self.pending: list[tuple[bytes, dict[bytes, Any]]] = []  # delivered, not acknowledged
        self.lose_next_reply = lose_next_reply
        self.round_trips: list[list[str]] = []
        self.acked: list[bytes] = []

    async def xgroup_create(self, *args: Any, **kwargs: Any) -> None:
        self.round_trips.append(["xgroup_create"])

    async def xautoclaim(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.round_trips.append(["xautoclaim"])
        return [b"0-0", [], []]

    async def xreadgroup(self, group: str, consumer: str, streams: dict[str, str], *args: Any, record: bool = True,
                         **kwargs: Any) -> Any:
        if record:
            self.round_trips.append(["xreadgroup"])
        if streams["s"] != ">":  # our own pending entries after that id
            after = self.id_order(streams["s"])
            return [[b"s", [e for e in self.pending if self.id_order(e[0]) > after]]] if self.pending else []
        if self.batches:
            batch = self.batches.pop(0)
            self.pending += batch
            if self.lose_next_reply:
                self.lose_next_reply = False
                raise ConnectionError("Connection closed by server.")
            return [[b"s", batch]]
        await asyncio.sleep(0.01)
        return []

    @staticmethod
    def id_order(entry_id: Any) -> int:
        return 0 if entry_id in ("0", b"0") else int(entry_id.split(b"-")[0])

    async def xack(self, stream: str, group: str, *ids: Any, record: bool = True) -> int:
        if record:
            self.round_trips.append(["xack"])
        self.acked += ids
        self.pending = [entry for entry in self.pending if entry[0] not in ids]
        return len(ids)

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self)


def consumer_for(redis: FakeRedis, handled: list[str]) -> StreamConsumer:
    router = Router()

    @router.route("orders/{id}", stream="s")
    async def placed(id: str) -> None:
        handled.append(id)

    settings = load_settings({"MQTT_CLIENT_ID": "c", "ENABLE_REDIS": "true", "STREAM_CLAIM_IDLE_MS": "600000"})
    return StreamConsumer(redis, "s", router.routes, settings, Services(None), ProcessStats(),  # type: ignore[arg-type]
                          ThreadPoolExecutor(1), consumer="c1")


def entry(n: int) -> tuple[bytes, dict[bytes, Any]]:
    router = Router()
    router.on("orders/{id}", lambda: None, stream="s")  # only to encode the entry as the bridge does
    context = MessageContext(f"orders/{n}", {"id": str(n)}, None, b"{}", 1, False, False, None, router.routes[0],
                             Services(None))  # type: ignore[arg-type]
    fields = encode_entry("orders/{id}", context)
    return f"{n}-0".encode(), {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


async def test_entries_whose_read_reply_was_lost_are_read_back_after_the_failure() -> None:
    handled: list[str] = []
    redis = FakeRedis([[entry(1), entry(2)], [entry(3)]], lose_next_reply=True)
    consumer = consumer_for(redis, handled)
    consumer.start()
    try:
        async with asyncio.timeout(10):
            while sorted(redis.acked) != [b"1-0", b"2-0", b"3-0"]:
                await asyncio.sleep(0.005)
    finally:
        await consumer.stop()
    assert sorted(handled) == ["1", "2", "3"] and redis.pending == []


async def test_a_handled_batch_is_acked_with_the_next_read() -> None:
    handled: list[str] = []
    router = Router()

    @router.route("orders/{id}", stream="s")
    async def placed(id: str) -> None:
        handled.append(id)

    route = router.routes[0]
    settings = load_settings({"MQTT_CLIENT_ID": "c", "ENABLE_REDIS": "true", "STREAM_CLAIM_IDLE_MS": "600000"})

    def entry(n: int) -> tuple[bytes, dict[bytes, Any]]:
        context = MessageContext(f"orders/{n}", {"id": str(n)}, None, b"{}", 1, False, False, None, route,
                                 Services(None))  # type: ignore[arg-type]
        fields = encode_entry(route.pattern, context)
        return f"{n}-0".encode(), {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}

    redis = FakeRedis([[entry(1), entry(2)], [entry(3)]])
    consumer = StreamConsumer(redis, "s", [route], settings, Services(None), ProcessStats(),  # type: ignore[arg-type]
                              ThreadPoolExecutor(1), consumer="c1")
    consumer.start()
    while redis.acked != [b"1-0", b"2-0", b"3-0"]:
        await asyncio.sleep(0.005)
    await consumer.stop()
    assert handled == ["1", "2", "3"]
    reads = [trip for trip in redis.round_trips if "xreadgroup" in trip]
    assert reads[:3] == [["xreadgroup"], ["xack", "xreadgroup"], ["xack", "xreadgroup"]]
    assert ["xack"] not in redis.round_trips[: redis.round_trips.index(reads[2]) + 1]
