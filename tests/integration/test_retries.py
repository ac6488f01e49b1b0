"""Route retry policies against a broker (Mosquitto on MQTT 5, the embedded broker on 3.1.1), seen at the wire."""

from __future__ import annotations

import asyncio

import redis.asyncio

from bootstrap.app import Application
from core.foundation.config import load_settings
from core.router import Router
from tests.apps.streams_support.harness import Publisher
from tests.integration.conftest import BrokerTarget, ProbeFn, ServeFn
from tests.support.servers import MosquittoServer, RedisServer
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


async def test_a_stream_route_whose_dependency_is_down_holds_its_entries_and_reads_no_more_until_it_answers(
        mosquitto: MosquittoServer, redis_server: RedisServer, unique_id: str) -> None:
    """Stream consumers use the same policy and breaker: a handler failing with ConnectionError holds its
    entries (uncounted retries, never `<stream>:dlq`), and while the breaker is open no new entries are read."""
    u, stream, count = unique_id, f"jobs-{unique_id}", 200
    down = True
    attempted: set[int] = set()
    handled: list[int] = []

    async def job(n: str) -> None:
        attempted.add(int(n))
        if down:
            raise ConnectionRefusedError(111, "the database is down")
        handled.append(int(n))

    router = Router()
    router.on(f"{u}/jobs/{{n}}", job, qos=1, stream=stream, retries=1)
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": u,
        "MQTT_GROUP_NAME": f"g{u}", "ENABLE_REDIS": "true", "REDIS_URL": redis_server.url,
        "STREAM_BATCH_SIZE": "10", "SHUTDOWN_TIMEOUT": "5",
    })
    app = Application.load(settings, router)
    runtime = app.make_runtime(app.routes)
    await runtime.start()
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port)
    publisher = Publisher(mosquitto.port)
    try:
        assert await runtime.wait_ready(20)
        (consumer,) = [hook for hook in runtime.hooks if hasattr(hook, "consumers")][0].consumers
        await asyncio.to_thread(publisher.publish, [(f"{u}/jobs/{n}", str(n).encode()) for n in range(count)])
        await wait_until(lambda: consumer.counters.held >= 13, "held entries probing the dependency", 30)
        # Every message reaches the stream meanwhile (the MQTT side does not wait for the handlers'
        # dependency), though not necessarily before the consumer has held its first entries.
        deadline = asyncio.get_running_loop().time() + 30
        while (length := await client.xlen(stream)) < count and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert length == count
        assert not consumer.breaker.closed
        assert len(attempted) <= 2 * 10, f"{len(attempted)} entries read while the dependency was down"
        down = False
        await wait_until(lambda: len(set(handled)) == count, f"all {count} handled", 60)
        assert await client.exists(stream + ":dlq") == 0
        assert consumer.counters.dead_lettered == 0 and consumer.breaker.closed
    finally:
        publisher.close()
        await client.delete(stream, stream + ":dlq")
        await client.aclose()
        await runtime.stop()
