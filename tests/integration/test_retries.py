"""Route retry policies against a broker (Mosquitto on MQTT 5, the embedded broker on 3.1.1), seen at the wire."""

from __future__ import annotations

import asyncio

from core.router import Router
from tests.integration.conftest import BrokerTarget, ProbeFn, ServeFn
from tests.support.ops import wait_until
from tests.support.rt_proxy import MqttProxy


async def test_a_retrying_message_lets_other_topics_through_and_its_ack_waits_for_its_final_outcome(
        broker: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    proxy = await MqttProxy(broker.host, broker.port).start()
    other_done = asyncio.Event()
    last_attempt = asyncio.Event()
    attempts = 0

    async def flaky(n: str) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            await last_attempt.wait()  # the test decides when the final outcome comes
        raise RuntimeError(f"attempt {attempts} failed")

    async def other(n: str) -> None:
        other_done.set()

    router = Router()
    router.on(f"{u}/a/{{n}}", flaky, qos=1, retries=2, retry_backoff=0.05)
    router.on(f"{u}/b/{{n}}", other, qos=1)
    try:
        runtime = await serve(broker, router, port=proxy.port)
        probe = await probe_factory(broker)
        await probe.subscribe(f"dead-letter/{u}/#")
        await probe.publish(f"{u}/a/1", "x")
        await wait_until(lambda: attempts >= 1, "the first attempt at a/1")
        await probe.publish(f"{u}/b/1", "y")
        await wait_until(lambda: other_done.is_set() and attempts == 3, "b/1 handled while a/1 is retried")
        # A QoS 1 publish of the runtime's own client goes out after every command queued before it:
        # any PUBACK already queued has crossed the proxy once it returns.
        await runtime.client.publish(f"{u}/barrier", "b", qos=1)
        assert proxy.pubacks_out() == []  # b/1 is done, but its ack waits behind a/1's (arrival order)

        last_attempt.set()
        await wait_until(lambda: len(proxy.pubacks_out()) >= 2, "both PUBACKs")
        delivered = {p.topic: p.packet_id for p in proxy.publishes_in(f"{u}/")}
        acks = proxy.pubacks_out()
        assert [p.packet_id for p in acks] == [delivered[f"{u}/a/1"], delivered[f"{u}/b/1"]]
        (letter,) = await probe.wait_count(f"dead-letter/{u}/a/1", 1)
        if broker.v5:
            assert (letter.user_properties["attempts"], letter.user_properties["error"]) == ("3", "attempt 3 failed")
        else:
            assert (letter.json()["attempts"], letter.json()["error"]) == (3, "attempt 3 failed")
        (sent,) = proxy.publishes_out(f"dead-letter/{u}/a/1")
        assert sent.seq < acks[0].seq  # dead-lettered, then acknowledged
        stats = runtime.stats.routes[f"{u}/a/{{n}}"]
        assert (stats.retried, stats.dead_lettered, stats.handled) == (2, 1, 0)
    finally:
        await proxy.stop()
