"""core.testing.TestClient: the real dispatcher behind a broker stand-in with MQTT semantics."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Callable

import pytest

from core.foundation.config import load_settings
from core.runtime.dispatcher import DeadLetter
from core.router import Router
from core.runtime.runtime import Runtime
from core.testing import TestClient, TestClientError
from tests.support.ops import wait_until


def recorder(log: list[tuple[str, str]], name: str) -> Callable[..., Any]:
    async def handler(topic: str) -> None:
        log.append((name, topic))

    return handler


# -- matching -------------------------------------------------------------------------------------


async def test_wildcards_params_and_dollar_topics() -> None:
    calls: list[tuple[str, str]] = []
    router = Router()
    router.on("a/+/c", recorder(calls, "plus"))
    router.on("a/#", recorder(calls, "hash"))
    router.on("#", recorder(calls, "all"))
    router.on("+/x", recorder(calls, "first-plus"))
    router.on("$SYS/#", recorder(calls, "sys"))

    async with TestClient(router) as client:
        for topic in ("a/b/c", "a", "a//c", "b/x", "$SYS/x", "$other/x", "a/b/c/d"):
            await client.publish(topic, "p")
    assert Counter(calls) == Counter([
        ("plus", "a/b/c"), ("hash", "a/b/c"), ("all", "a/b/c"),
        ("hash", "a"), ("all", "a"),  # `a/#` also matches `a`
        ("plus", "a//c"), ("hash", "a//c"), ("all", "a//c"),  # an empty level is a level
        ("all", "b/x"), ("first-plus", "b/x"),
        ("sys", "$SYS/x"),  # wildcards at the first level do not match $-topics
        ("hash", "a/b/c/d"), ("all", "a/b/c/d"),
    ])


async def test_route_params_reach_the_handler() -> None:
    seen: list[dict[str, str]] = []
    router = Router()

    @router.route("fleet/{fleet}/{device}/{rest:#}")
    async def handler(fleet: str, device: str, rest: str) -> None:
        seen.append({"fleet": fleet, "device": device, "rest": rest})

    async with TestClient(router) as client:
        result = await client.publish("fleet/f1/d7/temp/inside", b"\xff\x01")
    assert seen == [{"fleet": "f1", "device": "d7", "rest": "temp/inside"}]
    assert result.calls[0].params == {"fleet": "f1", "device": "d7", "rest": "temp/inside"}
    assert result.calls[0].payload == b"\xff\x01"  # not UTF-8: bytes


async def test_overlapping_plain_and_shared_routes_each_run_once() -> None:
    calls: list[tuple[str, str]] = []
    router = Router()
    router.on("ov/+", recorder(calls, "plain-plus"), qos=1)
    router.on("ov/+", recorder(calls, "shared-plus"), qos=1, shared=True)  # another (group, filter) pair
    router.on("ov/#", recorder(calls, "shared-hash"), shared=True, worker_count=2)
    router.on("ov/x", recorder(calls, "exact"))
    async with TestClient(router) as client:
        result = await client.publish("ov/x", "1", qos=1)
        await client.publish("ov/y", "2", qos=1)
    assert sorted(result.delivered_to) == sorted(["ov/+", "ov/+", "ov/#", "ov/x"])
    assert Counter(name for name, _ in calls) == {"plain-plus": 2, "shared-plus": 2, "shared-hash": 2, "exact": 1}


async def test_qos_is_the_minimum_of_publish_and_subscription_and_acks_follow_arrival() -> None:
    qos_seen: list[tuple[str, int]] = []
    router = Router()

    @router.route("q/a", qos=2)
    async def high(context: Any) -> None:
        qos_seen.append(("high", context.qos))

    @router.route("q/+", qos=0)
    async def low(context: Any) -> None:
        qos_seen.append(("low", context.qos))

    async with TestClient(router) as client:
        await client.publish("q/a", "x", qos=1)
        await client.publish("q/a", "y", qos=2)
        await client.publish("q/a", "z", qos=0)
    assert sorted(qos_seen) == sorted([("high", 1), ("low", 0), ("high", 2), ("low", 0), ("high", 0), ("low", 0)])
    assert [qos for _mid, qos in client.acks] == [1, 2]  # QoS 0 copies are never acknowledged


async def test_mqtt_311_mode_delivers_one_copy_per_message() -> None:
    calls: list[tuple[str, str]] = []
    router = Router()
    router.on("t/+", recorder(calls, "plus"), qos=1)
    router.on("t/#", recorder(calls, "hash"), qos=0)
    async with TestClient(router, protocol="3.1.1") as client:
        result = await client.publish("t/1", "x", qos=1, response_topic="ignored")
        assert client.acks == [(1, 1)]  # one copy at the highest matching QoS
    assert Counter(name for name, _ in calls) == {"plus": 1, "hash": 1}
    assert result.responses == []  # 3.1.1 carries no response topic


async def test_unmatched_topics_are_not_delivered() -> None:
    router = Router()
    router.on("only/this", recorder([], "x"))
    async with TestClient(router) as client:
        result = await client.publish("something/else", "x", qos=1)
    assert result.delivered_to == [] and result.calls == [] and result.dead_letters == []


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\x00b"])
async def test_invalid_topics_are_refused(topic: str) -> None:
    async with TestClient(Router()) as client:
        with pytest.raises(ValueError):
            await client.publish(topic, "x")


# -- responses, dead letters, timeouts -----------------------------------------------------------


async def test_response_topic_and_correlation_data() -> None:
    router = Router()

    @router.route("rpc/{n}", qos=1)
    async def double(n: str, payload: Any, context: Any) -> dict[str, Any]:
        return {"n": int(n) * 2, "props": dict(context.user_properties)}

    async with TestClient(router) as client:
        result = await client.publish("rpc/21", {"x": 1}, qos=1, response_topic="replies/me",
                                      correlation_data=b"req-7", user_properties={"k": "v"})
    [reply] = result.responses
    assert reply.json() == {"n": 42, "props": {"k": "v"}}
    assert reply.correlation_data == b"req-7"
    assert reply.qos == 1
    assert result.result == {"n": 42, "props": {"k": "v"}}


async def test_dead_letters_for_bad_payloads_errors_and_size() -> None:
    router = Router()

    @router.route("dl/{kind}", qos=1)
    async def handler(kind: str, payload: Any) -> None:
        if kind == "boom":
            raise RuntimeError("exploded")
        if kind == "refuse":
            raise DeadLetter("not for us")

    async with TestClient(router, env={"MAX_PAYLOAD_BYTES": "16", "DEAD_LETTER_TOPIC": "dlq/{topic}"}) as client:
        bad_json = await client.publish("dl/ok", b"{not json", qos=1)
        boom = await client.publish("dl/boom", "x", qos=1)
        refuse = await client.publish("dl/refuse", "x")
        big = await client.publish("dl/ok", "x" * 17)
        fine = await client.publish("dl/ok", "small")
    assert [d.error_type for d in bad_json.dead_letters] == ["PayloadError"]
    assert bad_json.dead_letters[0].topic == "dlq/dl/ok"
    assert bad_json.dead_letters[0].payload == b"{not json"
    assert [(d.error_type, d.error) for d in boom.dead_letters] == [("RuntimeError", "exploded")]
    assert [(d.error_type, d.error) for d in refuse.dead_letters] == [("DeadLetter", "not for us")]
    assert [d.error_type for d in big.dead_letters] == ["PayloadTooLarge"]
    assert fine.dead_letters == []
    assert len(client.dead_letters) == 4
    assert client.stats.dead_lettered == 4 and client.stats.handled == 1


async def test_dead_letters_on_mqtt_311_are_json_envelopes() -> None:
    router = Router()
    router.on("e/x", _raise_value_error)
    async with TestClient(router, protocol="3.1.1") as client:
        result = await client.publish("e/x", b"\xff\xfe")
    [dead] = result.dead_letters
    assert (dead.error_type, dead.error, dead.payload, dead.route) == ("ValueError", "bad", b"\xff\xfe", "e/x")
    assert result.published[0].json()["payload_encoding"] == "base64"


async def _raise_value_error() -> None:
    raise ValueError("bad")


async def test_route_timeout_cancels_the_handler_and_dead_letters() -> None:
    events: list[str] = []
    router = Router()

    @router.route("slow/{n}", qos=1, timeout=0.05)
    async def slow(n: str) -> None:
        events.append(f"start {n}")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append(f"cancelled {n}")
            raise
        events.append(f"finished {n}")  # never

    async with TestClient(router) as client:
        result = await client.publish("slow/1", "x", qos=1)
    assert events == ["start 1", "cancelled 1"]
    [dead] = result.dead_letters
    assert dead.error_type == "Timeout" and "timeout=0.05" in dead.error
    assert isinstance(result.calls[0].error, asyncio.CancelledError)
    assert client.acks == [(1, 1)]


async def test_a_hanging_handler_fails_the_publish_instead_of_the_whole_suite() -> None:
    release = asyncio.Event()
    router = Router()

    @router.route("hang")
    async def hang() -> None:
        await release.wait()

    async with TestClient(router, timeout=0.2) as client:
        with pytest.raises(TestClientError, match="still running"):
            await client.publish("hang", "x")
        release.set()


# -- what handlers publish -----------------------------------------------------------------------


async def test_published_messages_are_recorded_and_delivered_back() -> None:
    seen: list[Any] = []
    router = Router()

    @router.route("orders/{id}/placed", qos=1)
    async def placed(id: str, context: Any) -> None:
        await context.publish(f"orders/{id}/billing", {"id": id}, qos=1)
        await context.publish("audit/log", "placed", retain=True)

    @router.route("orders/+/billing", qos=1)
    async def billing(payload: Any) -> None:
        seen.append(payload)

    async with TestClient(router) as client:
        result = await client.publish("orders/9/placed", "{}", qos=1)
    assert [(m.topic, m.qos, m.retain) for m in result.published] == [
        ("orders/9/billing", 1, False), ("audit/log", 0, True)]
    assert seen == [{"id": "9"}]
    assert [c.route for c in result.calls] == ["orders/{id}/placed", "orders/+/billing"]

    async with TestClient(router, loopback=False) as quiet:
        await quiet.publish("orders/9/placed", "{}", qos=1)
    assert seen == [{"id": "9"}]  # not delivered again


async def test_sync_handlers_publish_with_publish_sync() -> None:
    router = Router()

    def plain(client: Any, payload: Any) -> None:  # runs in the thread pool
        client.publish_sync("out/sync", {"got": payload}, qos=1)

    router.on("in/sync", plain)
    async with TestClient(router) as client:
        result = await client.publish("in/sync", "hello")
    assert [m.json() for m in result.published] == [{"got": "hello"}]


async def test_a_publish_loop_is_reported() -> None:
    router = Router()

    @router.route("ping/{n}")
    async def ping(n: str, context: Any) -> None:
        await context.publish(f"ping/{int(n) + 1}", "again")

    async with TestClient(router, max_deliveries=50) as client:
        with pytest.raises(TestClientError, match="more than 50 deliveries"):
            await client.publish("ping/0", "x")


def test_plain_pytest_functions_use_the_with_form() -> None:
    router = Router()

    @router.route("sync/{x}")
    async def handler(x: str) -> str:
        return x.upper()

    with TestClient(router) as client:
        result = client.publish_sync("sync/abc", "", response_topic="r")
    assert result.responses[0].text() == "ABC"
    with pytest.raises(RuntimeError, match="with TestClient"):
        TestClient(router).publish_sync("sync/a", "")


# -- the same answers as the real runtime on a real broker ---------------------------------------

FILTERS = [
    ("d/+/t", False), ("d/#", False), ("d/+/t", True), ("d/a/t", True), ("+/+/+", False), ("#", True),
    ("d/{x}/t/{rest:#}", False), ("$SYS/#", False), ("+/a/#", True),
]
TOPICS = ["d/a/t", "d/b/t", "d", "d/a/t/x/y", "e/a/t", "x/a", "$SYS/broker", "d//t", "z"]


def build_differential_router(calls: list[tuple[str, str]], prefix: str = "") -> Router:
    router = Router()
    for index, (pattern, shared) in enumerate(FILTERS):
        full = pattern if pattern.startswith(("$", "#", "+")) else f"{prefix}{pattern}"

        async def handler(topic: str, index: int = index) -> None:
            calls.append((str(index), topic))

        router.on(full, handler, qos=1, shared=shared)
    return router


async def test_same_routes_run_as_in_the_real_runtime_on_mosquitto(mosquitto_factory: Any, unique_id: str) -> None:
    """Every (route, topic) pair the real runtime runs on Mosquitto, the test client runs too, as often."""
    from tests.support.ops import Publisher

    mosquitto = mosquitto_factory()  # private: filters such as `#` see only this test's traffic
    expected: list[tuple[str, str]] = []
    runtime = Runtime(load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": f"{unique_id}-rt",
        "MQTT_SESSION_EXPIRY": "0", "MQTT_GROUP_NAME": unique_id,
    }), build_differential_router(expected).routes)
    await runtime.start()
    assert await runtime.wait_ready(20)
    probe = await asyncio.to_thread(Publisher, mosquitto.host, mosquitto.port, f"{unique_id}-probe")
    try:
        for topic in TOPICS:
            if topic.startswith("$"):
                continue  # clients may not publish to $SYS on Mosquitto
            await asyncio.to_thread(probe.publish, topic, "x", 1)
        await asyncio.to_thread(probe.publish, "marker/end", "x", 1)
        # One connection delivers in order: once the marker is handled and nothing is in flight,
        # every earlier copy has been handled too.
        await wait_until(lambda: ("5", "marker/end") in expected and runtime.dispatcher.inflight == 0,
                         "the marker to pass through")
    finally:
        probe.close()
        await runtime.stop()

    got: list[tuple[str, str]] = []
    async with TestClient(build_differential_router(got)) as client:
        for topic in TOPICS:
            if not topic.startswith("$"):
                await client.publish(topic, "x", qos=1)
        await client.publish("marker/end", "x", qos=1)
    relevant = set(TOPICS) | {"marker/end"}  # not the broker's own $SYS messages
    assert Counter(c for c in got if c[1] in relevant) == Counter(c for c in expected if c[1] in relevant)
    assert ("1", "d") in got and ("6", "d/a/t/x/y") in got and ("2", "d/a/t") in got


# -- Redis Streams, in memory ----------------------------------------------------------------------


async def test_a_stream_route_runs_its_handler_as_the_consumer_would_without_redis() -> None:
    seen: list[dict[str, Any]] = []
    router = Router()

    class Tag:
        async def handle(self, context: Any, call_next: Any) -> Any:
            context.state["tagged"] = True
            return await call_next(context)

    @router.route("orders/{id}/placed", qos=1, shared=True, stream="orders", middleware=[Tag()])
    async def placed(id: str, payload: Any, topic: str, context: Any) -> dict[str, str]:
        delivery = context.state["stream"]
        seen.append({"id": id, "payload": payload, "topic": topic, "stream": delivery.stream,
                     "attempt": delivery.attempt, "tagged": context.state.get("tagged"), "qos": context.qos})
        return {"order": id}

    async with TestClient(router) as client:  # no ENABLE_REDIS, no Redis
        result = await client.publish("orders/7/placed", {"total": 3}, qos=1, response_topic="replies/7",
                                      correlation_data=b"c7")
    assert result.dead_letters == [] and result.stream_dead_letters == []
    assert seen == [{"id": "7", "payload": {"total": 3}, "topic": "orders/7/placed", "stream": "orders", "attempt": 1,
                     "tagged": True, "qos": 1}]
    assert result.result == {"order": "7"}
    [reply] = result.responses
    assert reply.json() == {"order": "7"} and reply.correlation_data == b"c7"
    [entry] = client.streams["orders"]
    assert entry.fields["route"] == "orders/{id}/placed" and entry.fields["topic"] == "orders/7/placed"
    assert client.acks == [(1, 1)]


async def test_a_failing_stream_entry_is_retried_then_moved_to_the_dlq() -> None:
    attempts: list[int] = []
    router = Router()

    @router.route("jobs/{n}", qos=1, stream="jobs")
    async def job(n: str, context: Any) -> None:
        attempts.append(context.state["stream"].attempt)
        if n == "poison":
            raise ValueError("cannot do it")
        if n == "refused":
            raise DeadLetter("refused on purpose")

    async with TestClient(router, env={"STREAM_MAX_RETRIES": "2"}) as client:
        poison = await client.publish("jobs/poison", "x", qos=1)
        assert attempts == [1, 2, 3]
        attempts.clear()
        refused = await client.publish("jobs/refused", "x", qos=1)
        assert attempts == [1]  # a DeadLetter is not retried
        ok = await client.publish("jobs/fine", "x", qos=1)
    [dead] = poison.stream_dead_letters
    assert (dead.stream, dead.original_stream, dead.route, dead.error_type, dead.attempts) == (
        "jobs:dlq", "jobs", "jobs/{n}", "ValueError", 3)
    assert dead.fields["topic"] == "jobs/poison"
    assert [d.error_type for d in refused.stream_dead_letters] == ["DeadLetter"]
    assert ok.stream_dead_letters == [] and poison.dead_letters == []  # the MQTT side succeeded: no MQTT dead letter
    assert len(client.acks) == 3


async def test_router_stream_routes_are_not_reachable_by_mqtt_only_by_feed_stream() -> None:
    got: list[tuple[Any, str]] = []
    router = Router()

    async def external(payload: Any, topic: str) -> None:
        got.append((payload, topic))

    router.stream("external-orders", external)
    async with TestClient(router) as client:
        result = await client.publish("$stream/external-orders", {"id": 1}, qos=1)
        assert result.delivered_to == [] and got == []  # no MQTT subscription, as in the runtime
        fed = await client.feed_stream("external-orders", {"id": 2})
        fields_only = await client.feed_stream("external-orders", fields={"id": "3", "kind": "x"})
        with pytest.raises(TestClientError, match="no route consumes the stream 'nope'"):
            await client.feed_stream("nope", "x")
    assert got == [({"id": 2}, "external-orders"), ({"id": "3", "kind": "x"}, "external-orders")]
    assert fed.delivered_to == ["$stream/external-orders"] and fed.calls[0].ok
    assert fields_only.calls[0].payload == {"id": "3", "kind": "x"}


def test_feed_stream_in_the_with_form() -> None:
    router = Router()

    def double(payload: Any) -> int:  # a plain handler runs in the thread pool
        return int(payload) * 2

    router.stream("numbers", double)
    with TestClient(router) as client:
        result = client.feed_stream_sync("numbers", "21")
    assert result.result == 42


async def test_context_transaction_is_not_simulated_and_says_so() -> None:
    router = Router()

    @router.route("tx/{n}")
    async def uses_db(context: Any) -> None:
        async with context.transaction():
            pass

    async with TestClient(router) as client:
        result = await client.publish("tx/1", "x")
    [dead] = result.dead_letters
    assert "needs a database" in dead.error and "DATABASE_URL" in dead.error
