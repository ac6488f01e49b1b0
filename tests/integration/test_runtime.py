"""The runtime end to end, in-process, against each broker: a private Mosquitto (MQTT 5) and the
embedded amqtt broker (MQTT 3.1.1). Handlers are closures that record what they saw.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, Callable

import pytest

from core.routing.context import MessageContext
from core.routing.middleware import BaseMiddleware, CallNext
from core.runtime.retry import Retry
from core.router import Router
from tests.integration.conftest import BrokerTarget, ProbeFn, ServeFn
from tests.support.rt_probe import Probe
from tests.support.rt_proxy import MqttProxy, next_seq
from tests.support.rt_wait import wait_until

pytestmark = pytest.mark.timeout(90)


async def settle(probe: Probe, topic: str, payload: str, arrived: Callable[[], bool]) -> None:
    """Publish a marker after the messages under test and wait until its handler saw it.

    Used before asserting exact counts: a duplicate or stray delivery of the earlier messages
    would (in practice) have been handled by the time a later message on the same connection is.
    """
    await probe.publish(topic, payload)
    await wait_until(arrived, f"marker {payload!r} on {topic!r}")


async def reading_stopped_or_all_received(runtime: Any, total: int) -> None:
    """Until the runtime stopped reading at MAX_INFLIGHT (nothing more can start before a handler
    finishes), or, were the limit missing, it received all `total` messages: the check that follows
    is then decided, with no sleep hoping a missing limit would show in time."""
    await wait_until(lambda: runtime._paused or runtime.stats.received >= total,
                     "the runtime to stop reading at MAX_INFLIGHT (or to receive everything)")


# -- routing ----------------------------------------------------------------------------------------


async def test_params_wildcards_and_payload_types(broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                                  unique_id: str) -> None:
    u = unique_id
    seen: list[tuple[Any, ...]] = []

    async def status(device_id: str, payload: Any, topic: str) -> None:
        seen.append(("status", device_id, payload, topic))

    async def logs(path: str, payload: Any) -> None:
        seen.append(("logs", path, payload))

    async def plus(topic: str) -> None:
        seen.append(("plus", topic))

    async def hashed(topic: str, payload: Any) -> None:
        seen.append(("hash", topic, payload))

    router = Router()
    router.on(f"{u}/devices/{{device_id}}/status", status, qos=1)
    router.on(f"{u}/logs/{{path:#}}", logs, qos=1)
    router.on(f"{u}/plus/+/end", plus, qos=1)
    router.on(f"{u}/hash/#", hashed, qos=1)
    await serve(broker, router)
    probe = await probe_factory(broker)

    await probe.publish(f"{u}/devices/42/status", {"state": "on"})
    await probe.publish(f"{u}/devices/43/status", b"[1, 2]")
    await probe.publish(f"{u}/devices/44/status", "plain text")
    await probe.publish(f"{u}/devices/45/status", b"\xff\x00binary")
    await probe.publish(f"{u}/logs/a/b/c", "line")
    await probe.publish(f"{u}/logs", "parent")
    await probe.publish(f"{u}/plus/x/end", "1")
    await probe.publish(f"{u}/plus/x/y/end", "no route")  # matches no subscription
    await probe.publish(f"{u}/hash", "2")
    await probe.publish(f"{u}/hash/q/r", "3")
    await wait_until(lambda: len(seen) >= 9, "9 handled messages")
    await settle(probe, f"{u}/hash/marker", "M", lambda: ("hash", f"{u}/hash/marker", "M") in seen)
    assert sorted(map(repr, seen)) == sorted(map(repr, [
        ("status", "42", {"state": "on"}, f"{u}/devices/42/status"),
        ("status", "43", [1, 2], f"{u}/devices/43/status"),
        ("status", "44", "plain text", f"{u}/devices/44/status"),
        ("status", "45", b"\xff\x00binary", f"{u}/devices/45/status"),
        ("logs", "a/b/c", "line"),
        ("logs", "", "parent"),
        ("plus", f"{u}/plus/x/end"),
        ("hash", f"{u}/hash", "2"),
        ("hash", f"{u}/hash/q/r", "3"),
        ("hash", f"{u}/hash/marker", "M"),
    ]))


class Trace(BaseMiddleware):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
        self.log.append(f"{self.name}>")
        try:
            result = await call_next(context)
        except Exception as exc:
            self.log.append(f"<{self.name}!{type(exc).__name__}")
            raise
        self.log.append(f"<{self.name}={result}")
        return result


class Deny(BaseMiddleware):
    async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
        if isinstance(context.payload, dict) and context.payload.get("deny"):
            return "denied"
        return await call_next(context)


class Enrich(BaseMiddleware):
    async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
        context.payload = {**context.payload, "enriched_by": "middleware", "site": context.params["site"]}
        return await call_next(context)


async def test_groups_and_middleware_order_short_circuit_and_payload_change(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    log: list[str] = []
    handled: list[Any] = []

    async def reading(site: str, sensor: str, payload: Any) -> str:
        log.append("handler")
        handled.append((site, sensor, payload))
        if payload.get("fail"):
            raise ValueError("bad reading")
        return "ok"

    router = Router()
    with router.group(prefix=f"{u}/site/{{site}}", middleware=[Trace("group", log), Deny()]) as site:
        with site.group(prefix="sensors", middleware=[Trace("nested", log)]) as sensors:
            sensors.on("{sensor}/reading", reading, qos=1, middleware=[Trace("route", log), Enrich()])
    await serve(broker, router)
    probe = await probe_factory(broker)

    await probe.publish(f"{u}/site/s1/sensors/t9/reading", {"v": 1})
    await wait_until(lambda: len(log) >= 7, "the chain to unwind")
    assert log == ["group>", "nested>", "route>", "handler", "<route=ok", "<nested=ok", "<group=ok"]
    assert handled == [("s1", "t9", {"v": 1, "enriched_by": "middleware", "site": "s1"})]

    log.clear()
    await probe.publish(f"{u}/site/s1/sensors/t9/reading", {"deny": True})
    await wait_until(lambda: len(log) >= 2, "the short-circuited chain")
    assert log == ["group>", "<group=denied"]

    log.clear()
    await probe.publish(f"{u}/site/s2/sensors/t1/reading", {"fail": True})
    await wait_until(lambda: len(log) >= 7, "the failing chain")
    assert log == ["group>", "nested>", "route>", "handler", "<route!ValueError", "<nested!ValueError",
                   "<group!ValueError"]
    assert len(handled) == 2  # the denied message never reached the handler


async def test_sync_handlers_run_in_the_thread_pool(broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                                    unique_id: str) -> None:
    u = unique_id
    gate = threading.Event()
    threads: list[str] = []
    results: list[bool] = []

    def blocking(payload: Any) -> None:
        threads.append(threading.current_thread().name)
        # Only an async handler on the event loop can open the gate: if this ran on the loop
        # (or blocked it), the gate would never open.
        results.append(gate.wait(20))

    async def opener(payload: Any) -> None:
        gate.set()

    router = Router()
    router.on(f"{u}/sync", blocking, qos=1)
    router.on(f"{u}/async", opener, qos=1)
    runtime = await serve(broker, router)
    probe = await probe_factory(broker)
    await probe.publish(f"{u}/sync", "wait")
    await wait_until(lambda: threads, "the sync handler to start")
    await probe.publish(f"{u}/async", "open")
    await wait_until(lambda: results, "the sync handler to finish")
    assert results == [True]
    assert threads[0].startswith("handler") and threads[0] != threading.main_thread().name
    assert "network" not in threads[0]
    assert runtime.stats.handled == 2


# -- responses and dead letters ----------------------------------------------------------------------


async def test_return_value_goes_to_the_response_topic(broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                                       unique_id: str) -> None:
    if not broker.v5:
        pytest.skip("response topics are MQTT 5; the embedded broker speaks 3.1.1")
    u = unique_id

    async def status(device_id: str, payload: Any) -> dict[str, Any]:
        return {"device_id": device_id, "echo": payload}

    def command(device_id: str) -> str:
        return f"sync:{device_id}"

    async def silent(payload: Any) -> None:
        return None

    router = Router()
    router.on(f"{u}/dev/{{device_id}}/status", status, qos=1)
    router.on(f"{u}/dev/{{device_id}}/command", command, qos=0)
    router.on(f"{u}/silent", silent, qos=1)
    runtime = await serve(broker, router)
    probe = await probe_factory(broker)
    await probe.subscribe(f"{u}/responses/#")

    await probe.publish(f"{u}/dev/7/status", {"x": 1}, response_topic=f"{u}/responses/a", correlation_data=b"corr-1")
    await probe.publish(f"{u}/dev/8/command", "go", qos=0, response_topic=f"{u}/responses/b",
                        correlation_data=b"\x00\x01")
    await probe.publish(f"{u}/silent", "x", response_topic=f"{u}/responses/c")
    await probe.publish(f"{u}/dev/9/status", "no response topic")
    await wait_until(lambda: runtime.stats.handled == 4, "4 handled messages")
    responses = await probe.wait_count(f"{u}/responses/", 2)
    by_topic = {m.topic: m for m in responses}
    assert by_topic[f"{u}/responses/a"].json() == {"device_id": "7", "echo": {"x": 1}}
    assert by_topic[f"{u}/responses/a"].correlation_data == b"corr-1"
    assert by_topic[f"{u}/responses/a"].qos == 1
    assert by_topic[f"{u}/responses/b"].payload == b"sync:8"
    assert by_topic[f"{u}/responses/b"].correlation_data == b"\x00\x01"
    await settle(probe, f"{u}/dev/10/status", "m", lambda: runtime.stats.handled == 5)
    assert len(probe.on(f"{u}/responses/")) == 2  # None returns and missing response topics publish nothing


async def test_bad_payloads_and_failing_handlers_go_to_dead_letter(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    good: list[Any] = []

    async def accept(payload: Any) -> None:
        good.append(payload)

    async def explode(payload: Any) -> None:
        raise ValueError(f"boom {payload}")

    def explode_sync(payload: Any) -> None:
        raise KeyError("sync boom")

    router = Router()
    router.on(f"{u}/in/auto", accept, qos=1)
    router.on(f"{u}/in/json", accept, qos=1, payload_format="json")
    router.on(f"{u}/in/raise", explode, qos=1)
    router.on(f"{u}/in/raise-sync", explode_sync, qos=0)
    runtime = await serve(broker, router, MAX_PAYLOAD_BYTES="100")
    probe = await probe_factory(broker)
    await probe.subscribe(f"dead-letter/{u}/#")

    await probe.publish(f"{u}/in/auto", b"{not json")
    await probe.publish(f"{u}/in/json", b"plain")
    await probe.publish(f"{u}/in/raise", b"42")
    await probe.publish(f"{u}/in/raise-sync", b"x", qos=0)
    await probe.publish(f"{u}/in/auto", b"x" * 101)
    letters = await probe.wait_count(f"dead-letter/{u}/", 5)

    if broker.v5:
        errors = {(m.topic, m.user_properties["error_type"]): m for m in letters}
        for m in letters:
            assert m.user_properties["original_topic"] == m.topic.removeprefix("dead-letter/")
            assert m.user_properties["route"].startswith(f"{u}/in/")
            assert m.user_properties["original_qos"] in ("0", "1")
        raised = errors[(f"dead-letter/{u}/in/raise", "ValueError")]
        assert raised.user_properties["error"] == "boom 42"
        assert raised.payload == b"42"  # the original payload, unchanged
        assert "invalid JSON" in errors[(f"dead-letter/{u}/in/auto", "PayloadError")].user_properties["error"]
        assert errors[(f"dead-letter/{u}/in/json", "PayloadError")].payload == b"plain"
        assert "sync boom" in errors[(f"dead-letter/{u}/in/raise-sync", "KeyError")].user_properties["error"]
        big = errors[(f"dead-letter/{u}/in/auto", "PayloadTooLarge")]
        assert "MAX_PAYLOAD_BYTES=100" in big.user_properties["error"]
        assert big.payload == b"x" * 101
    else:
        envelopes = {(m.topic, m.json()["error_type"]): m.json() for m in letters}
        assert set(envelopes) == {
            (f"dead-letter/{u}/in/auto", "PayloadError"), (f"dead-letter/{u}/in/json", "PayloadError"),
            (f"dead-letter/{u}/in/raise", "ValueError"), (f"dead-letter/{u}/in/raise-sync", "KeyError"),
            (f"dead-letter/{u}/in/auto", "PayloadTooLarge"),
        }
        raised = envelopes[(f"dead-letter/{u}/in/raise", "ValueError")]
        assert raised["error"] == "boom 42"
        assert raised["original_topic"] == f"{u}/in/raise"
        assert raised["payload"] == "42" and raised["payload_encoding"] == "utf-8"
        assert raised["route"] == f"{u}/in/raise"
        assert "MAX_PAYLOAD_BYTES=100" in envelopes[(f"dead-letter/{u}/in/auto", "PayloadTooLarge")]["error"]

    # The process is alive and keeps handling.
    await probe.publish(f"{u}/in/auto", {"still": "alive"})
    await wait_until(lambda: good == [{"still": "alive"}], "a good message after the failures")
    assert runtime.stats.dead_lettered == 5
    assert runtime.stats.failed == 2


async def test_custom_dead_letter_topic(broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                        unique_id: str) -> None:
    u = unique_id

    async def explode(payload: Any) -> None:
        raise RuntimeError("nope")

    router = Router()
    router.on(f"{u}/x/{{id}}", explode, qos=1)
    await serve(broker, router, DEAD_LETTER_TOPIC=f"{u}/dlq/{{topic}}/failed")
    probe = await probe_factory(broker)
    await probe.subscribe(f"{u}/dlq/#")
    await probe.publish(f"{u}/x/1", "a")
    (letter,) = await probe.wait_count(f"{u}/dlq/", 1)
    assert letter.topic == f"{u}/dlq/{u}/x/1/failed"


# -- acknowledgements ----------------------------------------------------------------------------------


async def test_puback_only_after_handler_and_in_arrival_order(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """Seen at the wire through a proxy: no PUBACK before its handler finished, PUBACKs in arrival order."""
    u = unique_id
    proxy = await MqttProxy(broker.host, broker.port).start()
    gates = {str(i): asyncio.Event() for i in range(4)}
    started: list[str] = []
    finished: dict[str, int] = {}

    async def work(n: str) -> None:
        started.append(n)
        await gates[n].wait()
        finished[n] = next_seq()
        if n == "2":
            raise RuntimeError("dead-lettered messages are acknowledged too")

    router = Router()
    router.on(f"{u}/ack/{{n}}", work, qos=1)
    try:
        runtime = await serve(broker, router, port=proxy.port)
        probe = await probe_factory(broker)
        for n in "0123":
            await probe.publish(f"{u}/ack/{n}", n)
        await wait_until(lambda: len(started) == 4, "4 handlers running")
        delivered = proxy.publishes_in(f"{u}/ack/")
        assert [p.topic for p in delivered] == [f"{u}/ack/{n}" for n in "0123"]
        packet_id = {p.topic.rsplit("/", 1)[1]: p.packet_id for p in delivered}  # type: ignore[union-attr]

        async def wire_barrier() -> None:
            # A QoS 1 publish of the runtime's own client goes out after every command queued
            # before it, so any PUBACK already queued has crossed the proxy once this returns.
            await runtime.client.publish(f"{u}/barrier", "b", qos=1)

        gates["3"].set()
        gates["1"].set()
        await wait_until(lambda: {"1", "3"} <= set(finished), "handlers 1 and 3 to finish")
        await wire_barrier()
        assert proxy.pubacks_out() == []  # 0 is still running: nothing may be acknowledged yet

        gates["0"].set()
        await wait_until(lambda: len(proxy.pubacks_out()) >= 2, "PUBACKs of 0 and 1")
        await wire_barrier()
        assert [p.packet_id for p in proxy.pubacks_out()] == [packet_id["0"], packet_id["1"]]

        gates["2"].set()
        await wait_until(lambda: len(proxy.pubacks_out()) >= 4, "PUBACKs of 2 and 3")
        acks = proxy.pubacks_out()
        assert [p.packet_id for p in acks] == [packet_id[n] for n in "0123"]
        for n, ack in zip("0123", acks):
            assert ack.seq > finished[n], f"PUBACK of message {n} before its handler finished"
        # The dead letter of message 2 was published before message 2 was acknowledged.
        (letter,) = proxy.publishes_out(f"dead-letter/{u}/ack/2")
        assert letter.seq < acks[2].seq
    finally:
        await proxy.stop()


@pytest.mark.parametrize("qos", [0, 1])
async def test_max_inflight_bounds_concurrent_handlers(broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                                       unique_id: str, qos: int) -> None:
    u = unique_id
    limit, total = 3, 12
    running: set[str] = set()
    peak = [0]
    done: list[str] = []
    release = asyncio.Event()

    async def work(n: str) -> None:
        running.add(n)
        peak[0] = max(peak[0], len(running))
        await release.wait()
        running.discard(n)
        done.append(n)

    router = Router()
    router.on(f"{u}/load/{{n}}", work, qos=qos)
    runtime = await serve(broker, router, MAX_INFLIGHT=str(limit))
    watcher = await probe_factory(broker)
    await watcher.subscribe(f"{u}/load/#", qos=0)
    probe = await probe_factory(broker)
    for n in range(total):
        await probe.publish(f"{u}/load/{n}", str(n), qos=qos)
    await wait_until(lambda: len(running) == limit, f"{limit} handlers running")
    await watcher.wait_count(f"{u}/load/", total)  # the broker has sent everything
    await reading_stopped_or_all_received(runtime, total)
    assert len(running) == limit
    assert runtime.dispatcher.inflight <= limit

    release.set()
    await wait_until(lambda: len(done) == total, f"all {total} messages handled")
    assert peak[0] == limit
    assert sorted(done, key=int) == [str(n) for n in range(total)]


async def test_max_inflight_holds_under_a_qos1_flood(broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                                     unique_id: str) -> None:
    """A flood of QoS 1 messages never puts more than MAX_INFLIGHT messages in the process.

    Receive Maximum alone does not bound it: Mosquitto 2.0 overshoots it by hundreds when acks
    trickle in while a backlog waits (measured: 490 messages in the process with MAX_INFLIGHT 20),
    so the runtime stops reading the socket at the limit for QoS 1 as it does for QoS 0.
    """
    u = unique_id
    limit, total = 10, 800
    peak = [0]
    handled: list[int] = []
    runtimes: list[Any] = []

    async def work(n: str) -> None:
        peak[0] = max(peak[0], runtimes[0].dispatcher.inflight)
        await asyncio.sleep(0.001)
        handled.append(int(n))

    router = Router()
    router.on(f"{u}/flood/{{n}}", work, qos=1)
    runtimes.append(await serve(broker, router, MAX_INFLIGHT=str(limit)))
    probe = await probe_factory(broker)
    for n in range(total):
        probe.paho.publish(f"{u}/flood/{n}", b"", 1)
    await wait_until(lambda: len(handled) >= total, f"all {total} messages handled", 60)
    assert sorted(handled) == list(range(total))
    assert 1 <= peak[0] <= limit


async def test_client_socket_sends_small_packets_at_once(broker: BrokerTarget, serve: ServeFn) -> None:
    """PUBACKs are tiny: with Nagle's algorithm on they would wait for the broker's delayed ACK."""
    runtime = await serve(broker, Router())
    sock = runtime.client._paho.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_max_inflight_holds_while_handlers_wait_for_their_own_publishes(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """The network thread must keep reading while handlers wait for PUBACKs of their publishes;
    that must not let more than MAX_INFLIGHT handlers run (QoS 0 input: no Receive Maximum helps)."""
    u = unique_id
    limit, total = 2, 12
    running: set[str] = set()
    peak = [0]
    published: list[str] = []
    done: list[str] = []
    release = asyncio.Event()

    async def work(n: str, context: MessageContext) -> None:
        running.add(n)
        peak[0] = max(peak[0], len(running))
        await context.publish(f"{u}/side/{n}", "x", qos=1)
        published.append(n)
        await release.wait()
        running.discard(n)
        done.append(n)

    router = Router()
    router.on(f"{u}/load/{{n}}", work, qos=0)
    runtime = await serve(broker, router, MAX_INFLIGHT=str(limit))
    watcher = await probe_factory(broker)
    await watcher.subscribe(f"{u}/load/#", qos=0)
    probe = await probe_factory(broker)
    for n in range(total):
        await probe.publish(f"{u}/load/{n}", str(n), qos=0)
    await wait_until(lambda: len(published) == limit, f"{limit} handlers past their publish")
    await watcher.wait_count(f"{u}/load/", total)
    await reading_stopped_or_all_received(runtime, total)
    assert peak[0] == limit
    release.set()
    await wait_until(lambda: len(done) == total, f"all {total} messages handled")
    assert peak[0] == limit


# -- overlapping routes -----------------------------------------------------------------------------------


async def overlapping_routes_run_once_each(target: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                           u: str) -> None:
    counts: dict[str, list[str]] = {"plus": [], "hash": [], "shared": [], "exact": []}

    def recorder(name: str) -> Any:
        async def handler(topic: str, payload: Any) -> None:
            counts[name].append(payload)
        return handler

    router = Router()
    router.on(f"{u}/ov/+", recorder("plus"), qos=1)
    router.on(f"{u}/ov/#", recorder("hash"), qos=1)
    router.on(f"{u}/ov/+", recorder("shared"), qos=1, shared=True)
    router.on(f"{u}/ov/x", recorder("exact"), qos=1)
    await serve(target, router)
    probe = await probe_factory(target)
    for i in range(5):
        await probe.publish(f"{u}/ov/x", f"m{i}")
    await probe.publish(f"{u}/ov/y", "y")
    expected = {"plus": 6, "hash": 6, "shared": 6, "exact": 5}
    await wait_until(lambda: all(len(counts[k]) >= v for k, v in expected.items()),
                     f"every route to see its messages (have { {k: len(v) for k, v in counts.items()} })")
    await settle(probe, f"{u}/ov/z/deeper", "marker", lambda: "marker" in counts["hash"])
    assert {k: sorted(v) for k, v in counts.items()} == {
        "plus": sorted([f"m{i}" for i in range(5)] + ["y"]),
        "hash": sorted([f"m{i}" for i in range(5)] + ["y", "marker"]),
        "shared": sorted([f"m{i}" for i in range(5)] + ["y"]),
        "exact": [f"m{i}" for i in range(5)],
    }


@pytest.mark.parametrize("duplicates", ["default", "allow_duplicate_messages false"])
async def test_overlapping_filters_each_route_once_on_mosquitto(
        mosquitto: Any, mosquitto_factory: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str,
        duplicates: str) -> None:
    """Plain+plain and plain+shared on one filter: MQTT 5 subscription ids pick the routes."""
    server = mosquitto if duplicates == "default" else mosquitto_factory(extra_conf=duplicates)
    target = BrokerTarget("mosquitto", server.host, server.port, v5=True)
    await overlapping_routes_run_once_each(target, serve, probe_factory, unique_id)


async def test_overlapping_filters_each_route_once_on_embedded_broker(
        serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    from core.transport.embedded_broker import EmbeddedBroker

    async with EmbeddedBroker("127.0.0.1", 0) as embedded:
        target = BrokerTarget("embedded", embedded.host, embedded.port, v5=False)
        await overlapping_routes_run_once_each(target, serve, probe_factory, unique_id)


# -- more failure paths ----------------------------------------------------------------------------------


class Explode(BaseMiddleware):
    async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
        raise LookupError("middleware failed")


async def test_timeouts_and_middleware_errors_are_dead_lettered(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    never = asyncio.Event()
    reached: list[str] = []

    async def slow(payload: Any) -> None:
        await never.wait()

    async def own_timeout(payload: Any) -> None:
        raise TimeoutError("the database did not answer")  # not the route's timeout

    async def guarded(payload: Any) -> None:
        reached.append(payload)

    router = Router()
    router.on(f"{u}/slow", slow, qos=1, timeout=0.2)
    # A TimeoutError is transient (it holds) unless the route says otherwise; these do, to be dead-lettered.
    permanent = Retry(permanent=(TimeoutError,))
    router.on(f"{u}/own-timeout", own_timeout, qos=1, retry=permanent)
    router.on(f"{u}/own-timeout-with-limit", own_timeout, qos=1, timeout=30, retry=permanent)
    router.on(f"{u}/guarded", guarded, qos=1, middleware=[Explode()])
    runtime = await serve(broker, router)
    probe = await probe_factory(broker)
    await probe.subscribe(f"dead-letter/{u}/#")
    for name in ("slow", "own-timeout", "own-timeout-with-limit", "guarded"):
        await probe.publish(f"{u}/{name}", "x")
    letters = await probe.wait_count(f"dead-letter/{u}/", 4)

    def error_of(topic: str) -> tuple[str, str]:
        (m,) = [m for m in letters if m.topic == f"dead-letter/{u}/{topic}"]
        if broker.v5:
            return m.user_properties["error_type"], m.user_properties["error"]
        return m.json()["error_type"], m.json()["error"]

    assert error_of("slow") == ("Timeout", "handler exceeded timeout=0.2 s")
    assert error_of("own-timeout") == ("TimeoutError", "the database did not answer")
    assert error_of("own-timeout-with-limit") == ("TimeoutError", "the database did not answer")
    assert error_of("guarded") == ("LookupError", "middleware failed")
    assert reached == []
    await wait_until(lambda: runtime.dispatcher.inflight == 0, "nothing left in flight")


async def test_handlers_publishing_at_qos1_under_backpressure_do_not_deadlock(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """With MAX_INFLIGHT handlers each waiting for the PUBACK of their own publish, the network
    thread must keep reading (the PUBACKs) even though no handler slot is free."""
    u = unique_id

    async def forward(n: str, payload: Any, context: MessageContext) -> None:
        await context.publish(f"{u}/out/{n}", payload, qos=1)

    router = Router()
    router.on(f"{u}/in/{{n}}", forward, qos=1)
    runtime = await serve(broker, router, MAX_INFLIGHT="2")
    probe = await probe_factory(broker)
    await probe.subscribe(f"{u}/out/#")
    for n in range(30):
        await probe.publish(f"{u}/in/{n}", str(n))
    out = await probe.wait_count(f"{u}/out/", 30)
    assert sorted(int(m.payload) for m in out) == list(range(30))
    await wait_until(lambda: runtime.stats.handled == 30, "30 handled")


async def test_unsubscribe_gets_its_unsuback_while_reading_is_paused_at_max_inflight(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """A process that leaves its groups while MAX_INFLIGHT handlers run (a worker the autoscaler
    retires) must read on to the UNSUBACK: a broker without Receive Maximum (3.1.1) has queued it
    behind publishes the runtime stopped reading."""
    u = unique_id
    release = asyncio.Event()

    async def hold(n: str) -> None:
        await release.wait()

    router = Router()
    router.on(f"{u}/in/{{n}}", hold, qos=1)
    runtime = await serve(broker, router, MAX_INFLIGHT="2")
    probe = await probe_factory(broker)
    for n in range(50):
        await probe.publish(f"{u}/in/{n}", str(n))
    await wait_until(lambda: runtime._paused, "the runtime to stop reading at MAX_INFLIGHT")
    assert await runtime.client.unsubscribe(timeout=5), "no UNSUBACK while paused at MAX_INFLIGHT"
    release.set()


async def test_burst_of_qos1_messages_is_handled_once_and_fully_acknowledged(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    total = 300 if broker.kind == "mosquitto" else 100
    seen: list[str] = []
    proxy = await MqttProxy(broker.host, broker.port).start()

    async def handler(n: str) -> None:
        seen.append(n)

    router = Router()
    router.on(f"{u}/b/{{n}}", handler, qos=1)
    try:
        runtime = await serve(broker, router, port=proxy.port, MAX_INFLIGHT="20")
        probe = await probe_factory(broker)
        infos = [probe.paho.publish(f"{u}/b/{n}", b"x", 1) for n in range(total)]
        await wait_until(lambda: all(i.is_published() for i in infos), "all PUBACKs from the broker")
        await wait_until(lambda: len(seen) >= total, f"{total} handled")
        await wait_until(lambda: len(proxy.pubacks_out()) >= total, f"{total} PUBACKs from the runtime")
        delivered = [p.packet_id for p in proxy.publishes_in(f"{u}/b/")]
        assert [p.packet_id for p in proxy.pubacks_out()] == delivered  # one each, in arrival order
        assert sorted(seen, key=int) == [str(n) for n in range(total)]
        assert len(runtime.dispatcher.acks) == 0
    finally:
        await proxy.stop()


async def test_qos2_messages_are_handled_exactly_once(broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                                      unique_id: str) -> None:
    u = unique_id
    seen: list[str] = []

    async def handler(n: str) -> None:
        seen.append(n)

    router = Router()
    router.on(f"{u}/q2/{{n}}", handler, qos=2)
    client_id = f"{u}-q2"
    runtime = await serve(broker, router, MQTT_CLIENT_ID=client_id)
    probe = await probe_factory(broker)
    for n in range(5):
        await probe.publish(f"{u}/q2/{n}", "x", qos=2)
    await wait_until(lambda: len(seen) >= 5, "5 QoS 2 messages")
    await runtime.stop()
    # Completed: a new session with the same id gets nothing again.
    await serve(broker, router, MQTT_CLIENT_ID=client_id)
    await settle(probe, f"{u}/q2/marker", "m", lambda: "marker" in seen)
    assert seen == ["0", "1", "2", "3", "4", "marker"]


async def test_stop_while_backpressured_leaves_unstarted_messages_to_the_broker(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    gate = asyncio.Event()
    seen: list[str] = []

    async def handler(n: str) -> None:
        seen.append(n)
        await gate.wait()

    router = Router()
    router.on(f"{u}/s/{{n}}", handler, qos=1)
    client_id = f"{u}-stop"
    runtime = await serve(broker, router, MQTT_CLIENT_ID=client_id, MAX_INFLIGHT="1")
    probe = await probe_factory(broker)
    for n in range(4):
        await probe.publish(f"{u}/s/{n}", "x")
    await wait_until(lambda: seen == ["0"], "the first handler to start")
    stopping = asyncio.create_task(runtime.stop())
    await wait_until(lambda: runtime._stopping, "the stop to begin")
    gate.set()
    assert await asyncio.wait_for(stopping, 20) is True
    assert seen == ["0"]

    await serve(broker, router, MQTT_CLIENT_ID=client_id)
    await wait_until(lambda: len(seen) >= 4, "the other messages in the next session")
    await settle(probe, f"{u}/s/marker", "m", lambda: "marker" in seen)
    assert seen[0] == "0" and sorted(seen[1:4]) == ["1", "2", "3"] and seen[4:] == ["marker"]


async def test_stale_subscription_of_an_older_app_version_runs_no_wrong_route(
        mosquitto: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """v1 subscribed `x/+` with id 1 in a persistent session; v2 gives id 1 to `a/+`. A message on
    `x/...` still arrives (the broker keeps v1's subscription) and must not run v2's `a/+` route."""
    u = unique_id
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    ran: list[str] = []

    async def old(topic: str) -> None:
        ran.append(f"old:{topic}")

    async def new(topic: str) -> None:
        ran.append(f"new:{topic}")

    v1 = Router()
    v1.on(f"{u}/x/{{id}}", old, qos=1)
    client_id = f"{u}-versions"
    first = await serve(target, v1, MQTT_CLIENT_ID=client_id, MQTT_SESSION_EXPIRY="30")
    await first.stop()

    v2 = Router()
    v2.on(f"{u}/a/{{id}}", new, qos=1)
    second = await serve(target, v2, MQTT_CLIENT_ID=client_id, MQTT_SESSION_EXPIRY="30")
    probe = await probe_factory(target)
    await probe.subscribe(f"dead-letter/{u}/#")
    await probe.publish(f"{u}/x/1", "stale")
    (letter,) = await probe.wait_count(f"dead-letter/{u}/x/", 1)
    assert letter.user_properties["error_type"] == "NoRoute"
    await settle(probe, f"{u}/a/2", "m", lambda: f"new:{u}/a/2" in ran)
    assert ran == [f"new:{u}/a/2"]
    assert second.stats.unrouted == 1
    await second.stop(session_expiry=0)


async def test_failures_on_the_dead_letter_topic_are_not_dead_lettered_again(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    calls: list[str] = []

    async def fails(topic: str) -> None:
        calls.append(topic)
        raise RuntimeError("always")

    router = Router()
    router.on(f"{u}/in", fails, qos=1)
    router.on(f"dead-letter/{u}/#", fails, qos=1)  # an app that consumes its own dead letters, badly
    runtime = await serve(broker, router)
    probe = await probe_factory(broker)
    await probe.subscribe(f"dead-letter/{u}/#")
    await probe.subscribe(f"dead-letter/dead-letter/{u}/#")  # where a dead letter's dead letter would go
    await probe.publish(f"{u}/in", "x")
    await wait_until(lambda: len(calls) >= 2, "the dead letter to be handled")
    await settle(probe, f"{u}/in", "y", lambda: len(calls) >= 4)
    assert calls == [f"{u}/in", f"dead-letter/{u}/in"] * 2
    await probe.wait_count(f"dead-letter/{u}/", 2)
    # Nothing more comes: once the runtime is idle, a marker it publishes itself reaches the probe
    # after anything it published before (one connection, delivered in order).
    await wait_until(lambda: runtime.dispatcher.inflight == 0, "the runtime to be idle")
    marker = f"dead-letter/dead-letter/{u}/marker"
    await runtime.client.publish(marker, b"m", 1)
    await probe.wait_count(marker, 1)
    assert [m.topic for m in probe.on(f"dead-letter/dead-letter/{u}/")] == [marker]
    assert len(probe.on(f"dead-letter/{u}/")) == 2
    assert runtime.stats.dead_lettered == 4


async def test_shared_route_splits_messages_between_runtimes(broker: BrokerTarget, serve: ServeFn,
                                                             probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    got: dict[str, list[str]] = {"a": [], "b": []}

    def router_for(name: str) -> Router:
        async def handler(n: str) -> None:
            got[name].append(n)

        router = Router()
        router.on(f"{u}/sh/{{n}}", handler, qos=1, shared=True, worker_count=2)
        return router

    await serve(broker, router_for("a"), MQTT_GROUP_NAME=f"g{u}")
    await serve(broker, router_for("b"), MQTT_GROUP_NAME=f"g{u}")
    probe = await probe_factory(broker)
    total = 20
    for n in range(total):
        await probe.publish(f"{u}/sh/{n}", "x")
    await wait_until(lambda: len(got["a"]) + len(got["b"]) >= total, f"{total} messages handled")
    await probe.publish(f"{u}/sh/marker", "m")
    await wait_until(lambda: "marker" in got["a"] + got["b"], "the marker")
    handled = sorted(got["a"] + got["b"])
    assert handled == sorted([str(n) for n in range(total)] + ["marker"])  # each exactly once
    assert got["a"] and got["b"]  # both members of the group get work
