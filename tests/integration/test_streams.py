"""Redis Streams against real servers: a private Mosquitto, private redis-servers, `python main.py --workers`.

The app under test (tests/apps/streams_app) records `<worker> <pid> <seq> <attempt>` for every entry it
handled, so lost and duplicated messages can be counted. Every process started here is stopped by PID.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from bootstrap.app import Application
from core.foundation.config import load_settings
from core.router import Router
from core.integrations.streams import original_fields
from tests.apps.streams_support.harness import AppProcess, Publisher, Records, app_env, wait_for
from tests.support.servers import MosquittoServer, RedisServer

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    client.close()


def _messages(prefix: str, count: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{prefix}/{seq}", str(seq).encode()) for seq in range(start, start + count)]


def _stream_env(mosquitto: MosquittoServer, redis_url: str, unique_id: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return app_env(
        MQTT_BROKER=mosquitto.host, MQTT_PORT=str(mosquitto.port), MQTT_CLIENT_ID=unique_id,
        MQTT_GROUP_NAME=f"g{unique_id}", ROUTERS_PACKAGE="tests.apps.streams_app.routers", ENABLE_REDIS="true",
        REDIS_URL=redis_url, STREAMS_APP_TOPIC=f"{unique_id}/orders", STREAMS_APP_STREAM=f"orders-{unique_id}",
        STREAMS_APP_RECORD=str(tmp_path / "records.txt"), **extra,
    )


def _pending(client: redis.Redis, stream: str, group: str) -> int:
    return int(client.xpending(stream, group)["pending"])


def test_10000_messages_two_workers_each_handled_once_and_acked(
        mosquitto: MosquittoServer, redis_server: RedisServer, redis_client: redis.Redis, unique_id: str,
        tmp_path: Path) -> None:
    count = 10_000
    env = _stream_env(mosquitto, redis_server.url, unique_id, tmp_path)
    stream, group = f"orders-{unique_id}", f"g{unique_id}"
    app = AppProcess(tmp_path / "app.log", env, ["--workers", "2"])
    publisher = Publisher(mosquitto.port)
    try:
        app.wait_log(r"all 2 worker\(s\) subscribed")
        publisher.publish(_messages(f"{unique_id}/orders", count))
        records = Records(tmp_path / "records.txt")
        wait_for(lambda: records.count() >= count, f"{count} handled entries", 90)
        wait_for(lambda: _pending(redis_client, stream, group) == 0, "no pending entries", 30)
        seqs = records.seqs()
        assert set(seqs) == {str(i) for i in range(count)}, "lost messages"
        assert max(seqs.values()) == 1, f"duplicates: {[s for s, n in seqs.items() if n > 1][:10]}"
        assert set(records.workers()) == {"w0", "w1"}, records.workers()
        assert redis_client.xlen(stream) == count
        info = {g["name"].decode(): g for g in redis_client.xinfo_groups(stream)}
        assert info[group]["pending"] == 0 and info[group]["lag"] == 0
        consumers = {c["name"].decode() for c in redis_client.xinfo_consumers(stream, group)}
        assert consumers == {f"{unique_id}-w0", f"{unique_id}-w1"}  # `<MQTT_CLIENT_ID>-w<i>`, unique per replica
    finally:
        publisher.close()
        assert app.stop() == 0, app.log()[-3000:]


def test_sigkilled_worker_pending_entries_are_reclaimed(
        mosquitto: MosquittoServer, redis_server: RedisServer, redis_client: redis.Redis, unique_id: str,
        tmp_path: Path) -> None:
    """A worker SIGKILLs itself in the middle of a batch; the others reclaim its pending entries."""
    count, kill_seq = 10_000, 3_000
    env = _stream_env(mosquitto, redis_server.url, unique_id, tmp_path, STREAM_CLAIM_IDLE_MS="1500",
                      STREAMS_APP_KILL_SEQ=str(kill_seq), STREAMS_APP_MARKER=str(tmp_path / "killed"),
                      STREAMS_APP_DELAY="0.01", WORKER_MAX_RESTARTS="5")
    stream, group = f"orders-{unique_id}", f"g{unique_id}"
    app = AppProcess(tmp_path / "app.log", env, ["--workers", "2"])
    publisher = Publisher(mosquitto.port)
    try:
        app.wait_log(r"all 2 worker\(s\) subscribed")
        publisher.publish(_messages(f"{unique_id}/orders", count))
        records = Records(tmp_path / "records.txt")
        wait_for(lambda: (tmp_path / "killed").exists(), "the worker to kill itself", 60)
        wait_for(lambda: set(records.seqs()) >= {str(i) for i in range(count)}, f"all {count} entries handled", 90)
        wait_for(lambda: _pending(redis_client, stream, group) == 0, "no pending entries", 30)
        attempts = {seq: attempt for _, _, seq, attempt in records.lines()}
        assert attempts[str(kill_seq)] >= 2, "the entry the worker died on was handled again after a reclaim"
        assert re.search(r"reclaimed \d+ entr\(ies\) left pending by another consumer", app.log())
        assert re.search(r"worker w\d \(pid \d+\) .*(killed|signal|SIGKILL)", app.log(), re.IGNORECASE), \
            "the supervisor noticed the dead worker"
        lost = {str(i) for i in range(count)} - set(records.seqs())
        assert not lost
    finally:
        publisher.close()
        app.stop()


async def test_poison_entry_lands_in_dlq_after_retries_and_others_go_on(
        mosquitto: MosquittoServer, redis_server: RedisServer, redis_client: redis.Redis, unique_id: str) -> None:
    stream, poison = f"orders-{unique_id}", 13
    handled: list[int] = []
    calls: dict[int, int] = {}

    async def placed(seq: str, payload: dict[str, Any], context: Any) -> None:
        number = int(seq)
        calls[number] = calls.get(number, 0) + 1
        assert payload == {"seq": number}
        if number == poison:
            raise ValueError(f"cannot place order {number}")
        handled.append(number)

    router = Router()
    router.on(f"{unique_id}/orders/{{seq}}", placed, qos=1, stream=stream)
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": unique_id,
        "MQTT_GROUP_NAME": f"g{unique_id}", "ENABLE_REDIS": "true", "REDIS_URL": redis_server.url,
        "STREAM_MAX_RETRIES": "2", "STREAM_RETRY_DELAY": "50ms", "SHUTDOWN_TIMEOUT": "5",
    })
    app = Application.load(settings, router)
    runtime = app.make_runtime(app.routes)
    await runtime.start()
    publisher = Publisher(mosquitto.port)
    try:
        assert await runtime.wait_ready(20)
        await asyncio.to_thread(publisher.publish, [(f"{unique_id}/orders/{i}", b'{"seq": %d}' % i) for i in range(50)])
        dlq = stream + ":dlq"
        await _until(lambda: len(handled) == 49 and redis_client.xlen(dlq) == 1 and runtime.stats.dead_lettered == 1,
                     "49 handled and one dead letter")
        await _until(lambda: _pending(redis_client, stream, f"g{unique_id}") == 0, "no pending entries")
        assert sorted(handled) == [i for i in range(50) if i != poison]
        assert calls[poison] == 3  # the first attempt and STREAM_MAX_RETRIES=2 retries
        route_stats = runtime.stats.routes[f"stream:{stream}"]
        # Per route: 49 handled, 1 dead-lettered; `failed` counts failed attempts (3 for the poison entry).
        assert (route_stats.handled, route_stats.failed, route_stats.dead_lettered) == (49, 3, 1)
        counters = runtime.stats.snapshot()["streams"][stream]
        assert counters == {"handled": 49, "failed": 3, "retried": 2, "dead_lettered": 1, "reclaimed": 0, "held": 0}
        [(_, entry)] = redis_client.xrange(dlq)
        fields = {k.decode(): v for k, v in entry.items()}
        assert fields["error"] == b"ValueError: cannot place order 13"
        assert fields["consumer"] == unique_id.encode()  # the consumer is named after the MQTT client id
        assert fields["attempts"] == b"3"
        assert fields["original_stream"] == stream.encode()
        original = original_fields(entry)
        assert original["topic"] == f"{unique_id}/orders/13".encode()
        assert original["payload"] == b'{"seq": 13}'
        assert original["params"] == b'{"seq":"13"}'
    finally:
        publisher.close()
        await runtime.stop()
        redis_client.delete(stream, stream + ":dlq")


async def test_redis_restart_during_a_stream_run_loses_nothing(
        mosquitto: MosquittoServer, redis_factory: Any, unique_id: str, caplog: pytest.LogCaptureFixture) -> None:
    server: RedisServer = redis_factory(appendonly=True)
    stream, count = f"orders-{unique_id}", 3000
    handled: list[int] = []
    lock = threading.Lock()

    async def placed(seq: str) -> None:
        with lock:
            handled.append(int(seq))

    router = Router()
    router.on(f"{unique_id}/orders/{{seq}}", placed, qos=1, stream=stream)
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": unique_id,
        "MQTT_GROUP_NAME": f"g{unique_id}", "ENABLE_REDIS": "true", "REDIS_URL": server.url, "SHUTDOWN_TIMEOUT": "5",
        "MAX_INFLIGHT": "50",
    })
    app = Application.load(settings, router)
    runtime = app.make_runtime(app.routes)
    caplog.set_level(logging.WARNING, logger="core.streams")
    await runtime.start()
    publisher = Publisher(mosquitto.port)
    try:
        assert await runtime.wait_ready(20)
        publisher.publish_in_background(_messages(f"{unique_id}/orders", count), rate=1500)
        await _until(lambda: len(handled) >= count // 4, "a quarter handled before the restart")
        await asyncio.to_thread(server.stop)
        # While Redis is away the bridge holds the MQTT acknowledgements: messages wait in flight.
        await _until(lambda: runtime.dispatcher.inflight > 0, "messages held while Redis is down")
        await asyncio.sleep(1.0)  # Redis stays away for a while (not an assertion)
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(publisher.join)
        await _until(lambda: set(handled) >= set(range(count)), f"all {count} handled", 60)
        assert "Redis unreachable" in caplog.text
        client = redis.Redis(host=server.host, port=server.port)
        try:
            await _until(lambda: _pending(client, stream, f"g{unique_id}") == 0, "no pending entries")
        finally:
            client.close()
    finally:
        publisher.close()
        await runtime.stop()


async def test_consumer_of_an_external_stream(redis_server: RedisServer, redis_client: redis.Redis,
                                              mosquitto: MosquittoServer, unique_id: str) -> None:
    stream = f"external-{unique_id}"
    got: list[Any] = []

    async def on_entry(payload: Any, topic: str, context: Any) -> None:
        got.append((payload, topic, context.state["stream"].attempt))

    router = Router()
    router.stream(stream, on_entry)
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": unique_id,
        "MQTT_GROUP_NAME": f"g{unique_id}", "ENABLE_REDIS": "true", "REDIS_URL": redis_server.url,
    })
    app = Application.load(settings, router)
    runtime = app.make_runtime(app.routes)
    assert runtime.subscriptions == []  # a consumer-only route subscribes to nothing on MQTT
    redis_client.xadd(stream, {"payload": b'{"order": 1}'})  # written before any consumer existed
    await runtime.start()
    try:
        redis_client.xadd(stream, {"order": "2", "state": "new"})
        await _until(lambda: len(got) == 2, "two entries consumed")
        assert got == [({"order": 1}, stream, 1), ({"order": "2", "state": "new"}, stream, 1)]
        await _until(lambda: _pending(redis_client, stream, f"g{unique_id}") == 0, "no pending entries")
    finally:
        await runtime.stop()
        redis_client.delete(stream)


async def _until(condition: Any, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)



async def test_redis_out_of_memory_holds_messages_and_dead_letters_none(
        mosquitto: MosquittoServer, redis_factory: Any, unique_id: str, caplog: pytest.LogCaptureFixture) -> None:
    """XADD answered with OOM (maxmemory reached, noeviction): the MQTT acks wait; after the limit is raised
    every message is appended and handled, and none was dead-lettered."""
    server: RedisServer = redis_factory(extra_args=["--maxmemory-policy", "noeviction"])
    stream, count = f"orders-{unique_id}", 20
    handled: list[int] = []

    async def placed(seq: str) -> None:
        handled.append(int(seq))

    router = Router()
    router.on(f"{unique_id}/orders/{{seq}}", placed, qos=1, stream=stream)
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": unique_id,
        "MQTT_GROUP_NAME": f"g{unique_id}", "ENABLE_REDIS": "true", "REDIS_URL": server.url, "SHUTDOWN_TIMEOUT": "5",
    })
    app = Application.load(settings, router)
    runtime = app.make_runtime(app.routes)
    caplog.set_level(logging.WARNING, logger="core.streams")
    client = redis.Redis(host=server.host, port=server.port)
    await runtime.start()
    publisher = Publisher(mosquitto.port)
    try:
        assert await runtime.wait_ready(20)
        await _until(lambda: client.exists(stream), "the consumer group (and its stream) to exist")
        client.config_set("maxmemory", "1")  # every XADD is now refused with OOM
        writer = runtime.services.extras["stream_writer"]
        await asyncio.to_thread(publisher.publish, _messages(f"{unique_id}/orders", count))
        await _until(lambda: writer.down and runtime.dispatcher.inflight == count, "all messages held, unacknowledged")
        assert handled == [] and client.xlen(stream) == 0
        assert runtime.stats.dead_lettered == 0
        client.config_set("maxmemory", "0")
        await _until(lambda: sorted(handled) == list(range(count)), f"all {count} handled after the limit was raised")
        await _until(lambda: runtime.dispatcher.inflight == 0, "every MQTT message acknowledged")
        assert runtime.stats.dead_lettered == 0
        assert runtime.stats.routes[f"{unique_id}/orders/{{seq}}"].dead_lettered == 0
        assert client.xlen(stream) == count
        assert "Redis cannot take entries now (OutOfMemoryError" in caplog.text
        assert "Redis is reachable again" in caplog.text
    finally:
        publisher.close()
        client.close()
        await runtime.stop()


async def test_undecodable_entry_counts_as_dead_lettered_for_its_route(
        redis_server: RedisServer, redis_client: redis.Redis, mosquitto: MosquittoServer, unique_id: str) -> None:
    stream = f"external-{unique_id}"
    got: list[Any] = []

    async def on_entry(payload: Any) -> None:
        got.append(payload)

    router = Router()
    router.stream(stream, on_entry, payload_format="json")
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": unique_id,
        "MQTT_GROUP_NAME": f"g{unique_id}", "ENABLE_REDIS": "true", "REDIS_URL": redis_server.url,
    })
    app = Application.load(settings, router)
    runtime = app.make_runtime(app.routes)
    redis_client.xadd(stream, {"payload": b"{not json"})
    redis_client.xadd(stream, {"payload": b'{"ok": 1}'})
    await runtime.start()
    try:
        await _until(lambda: got == [{"ok": 1}] and runtime.stats.dead_lettered == 1, "one handled, one in :dlq")
        assert redis_client.xlen(stream + ":dlq") == 1
        route_stats = runtime.stats.routes[f"stream:{stream}"]
        assert (route_stats.handled, route_stats.failed, route_stats.dead_lettered) == (1, 0, 1)
        assert runtime.stats.dead_lettered == 1
    finally:
        await runtime.stop()
        redis_client.delete(stream, stream + ":dlq")


async def test_replicas_consume_as_distinct_consumers_named_after_their_client_ids(
        mosquitto: MosquittoServer, redis_server: RedisServer, redis_client: redis.Redis, unique_id: str) -> None:
    """Two pods of one Deployment (same group, different MQTT client ids) are two consumers of the group."""
    stream, group, count = f"orders-{unique_id}", f"g{unique_id}", 200
    handled: list[tuple[str, int]] = []

    router = Router()

    async def placed(seq: str, context: Any) -> None:
        handled.append((context.state["stream"].entry_id, int(seq)))

    router.on(f"{unique_id}/orders/{{seq}}", placed, qos=1, shared=True, stream=stream)
    runtimes = []
    for pod in ("pod-a", "pod-b"):
        settings = load_settings({
            "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": f"{unique_id}-{pod}",
            "MQTT_GROUP_NAME": group, "ENABLE_REDIS": "true", "REDIS_URL": redis_server.url, "SHUTDOWN_TIMEOUT": "5",
        })
        app = Application.load(settings, router)
        runtimes.append(app.make_runtime(app.routes))
    publisher = Publisher(mosquitto.port)
    try:
        for runtime in runtimes:
            await runtime.start()
            assert await runtime.wait_ready(20)
        await asyncio.to_thread(publisher.publish, _messages(f"{unique_id}/orders", count))
        await _until(lambda: len(handled) >= count, f"{count} handled")
        await _until(lambda: _pending(redis_client, stream, group) == 0, "no pending entries")
        assert sorted(seq for _, seq in handled) == list(range(count))
        consumers = {c["name"].decode() for c in redis_client.xinfo_consumers(stream, group)}
        assert consumers == {f"{unique_id}-pod-a", f"{unique_id}-pod-b"}
    finally:
        publisher.close()
        for runtime in runtimes:
            await runtime.stop()
        redis_client.delete(stream)
