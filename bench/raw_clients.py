"""Measure the raw MQTT client libraries (paho-mqtt 2.x, aiomqtt 2.x) on a private Mosquitto.

Run:  .venv/bin/python -m bench.raw_clients [--count 20000] [--repeat 3]

What is measured, per client:
- QoS 1 drain: a persistent session is registered, the client goes away, N QoS 1
  messages are queued for it, then it reconnects; msgs/s is first-to-last message.
- QoS 0 flood: a publisher process sends N QoS 0 messages as fast as it can while
  the client is connected; received/s and loss.
- Latency: a publisher process sends at a moderate rate (``--rate``); each payload
  carries its send time, so p50/p99 is publish-to-handler time.

The pieces are importable so that other benchmarks measure a framework the same
way: implement :class:`Subscriber` (``register`` + ``consume``) and pass a factory
to :func:`drain_backlog` or :func:`live_stream`; every received payload goes to
:meth:`Recorder.record` (bytes, str, or an already decoded dict).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Protocol

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO_ROOT)

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.servers import MosquittoServer

SESSION_EXPIRY = 300
DEFAULT_PAYLOAD_SIZE = 64


class Broker(Protocol):
    host: str
    port: int


# -- payloads and recording ---------------------------------------------------

def make_payload(seq: int, size: int = DEFAULT_PAYLOAD_SIZE) -> bytes:
    """A JSON payload ``{"seq": n, "ts": send time}`` padded to about ``size`` bytes."""
    body = b'{"seq":%d,"ts":%.6f' % (seq, time.time())
    pad = size - len(body) - 10
    if pad > 0:
        return body + b',"pad":"' + b"x" * pad + b'"}'
    return body + b"}"


class Recorder:
    """Counts received messages by sequence number and keeps their latencies.

    Thread-safe; the subscriber calls :meth:`record` once per delivered message.
    """

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self._seen = bytearray(expected)
        self._lock = threading.Lock()
        self.received = 0
        self.unique = 0
        self.duplicates = 0
        self.malformed = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []
        self._last_activity = time.monotonic()
        self._published_at: float | None = None
        self.ready = threading.Event()  # the subscriber's subscription is in place
        self.done = threading.Event()  # every expected sequence number arrived

    def record(self, payload: bytes | bytearray | str | dict[str, Any]) -> None:
        now = time.time()
        try:
            data = payload if isinstance(payload, dict) else json.loads(payload)
            seq = int(data["seq"])
            sent = float(data["ts"])
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.malformed += 1
            return
        with self._lock:
            self.received += 1
            self._last_activity = time.monotonic()
            if not self.first:
                self.first = now
            self.last = now
            if not 0 <= seq < self.expected or self._seen[seq]:
                self.duplicates += 1
                return
            self._seen[seq] = 1
            self.unique += 1
            self.latencies.append(now - sent)
            if self.unique == self.expected:
                self.done.set()

    def mark_published(self) -> None:
        """The publisher has finished: from now on, silence means loss."""
        with self._lock:
            self._published_at = time.monotonic()

    def wait_finished(self, timeout: float, idle: float = 5.0) -> bool:
        """Wait until every message arrived (True), or the deadline passed, or
        nothing arrived for ``idle`` seconds after :meth:`mark_published` (False)."""
        deadline = time.monotonic() + timeout
        while not self.done.wait(0.05):
            now = time.monotonic()
            if now > deadline:
                return False
            with self._lock:
                published = self._published_at
                quiet_since = max(self._last_activity, published or 0.0)
            if published is not None and now - quiet_since > idle:
                return False
        return True

    @property
    def lost(self) -> int:
        return self.expected - self.unique

    @property
    def rate(self) -> float:
        """Messages per second from the first to the last message received."""
        span = self.last - self.first
        return (self.unique - 1) / span if self.unique > 1 and span > 0 else 0.0

    def percentile_ms(self, pct: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
        return ordered[index] * 1000


# -- subscribers --------------------------------------------------------------

class Subscriber(Protocol):
    """A client under test, bound to one client id, topic and QoS."""

    def register(self) -> None:
        """Create a fresh persistent session subscribed to the topic, then leave."""

    def consume(self, recorder: Recorder, timeout: float) -> None:
        """Connect (resuming the session), subscribe, set ``recorder.ready``, feed
        every message to ``recorder.record`` until ``recorder.wait_finished``."""


SubscriberFactory = Callable[[Broker, str, str, int], Subscriber]


def _session_properties() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY
    return props


class PahoSubscriber:
    """paho-mqtt 2.x with its network loop thread; optional manual acknowledgement."""

    def __init__(
        self, broker: Broker, client_id: str, topic: str, qos: int,
        *, manual_ack: bool = False, protocol: int = 5,
    ) -> None:
        self.broker, self.client_id, self.topic, self.qos = broker, client_id, topic, qos
        self.manual_ack = manual_ack
        self.protocol = protocol

    def _client(self, clean: bool) -> mqtt.Client:
        if self.protocol == 5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=self.client_id,
                protocol=mqtt.MQTTv5, manual_ack=self.manual_ack,
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean,
                protocol=mqtt.MQTTv311, manual_ack=self.manual_ack,
            )
        return client

    def _connect(self, client: mqtt.Client, clean: bool) -> None:
        if self.protocol == 5:
            client.connect(self.broker.host, self.broker.port, clean_start=clean,
                           properties=_session_properties())
        else:
            client.connect(self.broker.host, self.broker.port)

    def register(self) -> None:
        client = self._client(clean=True)
        subscribed = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, self.qos)
        client.on_subscribe = lambda *a: subscribed.set()
        self._connect(client, clean=True)
        client.loop_start()
        try:
            if not subscribed.wait(30):
                raise RuntimeError(f"{self.client_id}: no SUBACK")
        finally:
            client.disconnect()
            client.loop_stop()

    def consume(self, recorder: Recorder, timeout: float) -> None:
        client = self._client(clean=False)
        record = recorder.record
        if self.manual_ack:
            ack = client.ack

            def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
                record(msg.payload)
                ack(msg.mid, msg.qos)
        else:
            def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
                record(msg.payload)

        client.on_message = on_message
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, self.qos)
        client.on_subscribe = lambda *a: recorder.ready.set()
        self._connect(client, clean=False)
        client.loop_start()
        try:
            recorder.wait_finished(timeout)
        finally:
            client.disconnect()
            client.loop_stop()


class AiomqttSubscriber:
    """aiomqtt 2.x: ``async for message in client.messages`` (acks on receipt)."""

    def __init__(self, broker: Broker, client_id: str, topic: str, qos: int, *, protocol: int = 5) -> None:
        self.broker, self.client_id, self.topic, self.qos = broker, client_id, topic, qos
        self.protocol = protocol

    def _client(self, clean: bool) -> aiomqtt.Client:
        if self.protocol == 5:
            return aiomqtt.Client(
                self.broker.host, self.broker.port, identifier=self.client_id,
                protocol=aiomqtt.ProtocolVersion.V5, clean_start=clean,
                properties=_session_properties(),
            )
        return aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V311, clean_session=clean,
        )

    def register(self) -> None:
        async def run() -> None:
            async with self._client(clean=True) as client:
                await client.subscribe(self.topic, self.qos)
        asyncio.run(run())

    def consume(self, recorder: Recorder, timeout: float) -> None:
        asyncio.run(self._consume(recorder, timeout))

    async def _consume(self, recorder: Recorder, timeout: float) -> None:
        async with self._client(clean=False) as client:
            await client.subscribe(self.topic, self.qos)
            recorder.ready.set()

            async def pump() -> None:
                record, done = recorder.record, recorder.done
                async for message in client.messages:
                    record(message.payload)  # type: ignore[arg-type]
                    if done.is_set():
                        return

            task = asyncio.create_task(pump())
            await asyncio.get_running_loop().run_in_executor(None, recorder.wait_finished, timeout)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


def paho_factory(*, manual_ack: bool = False, protocol: int = 5) -> SubscriberFactory:
    def make(broker: Broker, client_id: str, topic: str, qos: int) -> Subscriber:
        return PahoSubscriber(broker, client_id, topic, qos, manual_ack=manual_ack, protocol=protocol)
    return make


def aiomqtt_factory(*, protocol: int = 5) -> SubscriberFactory:
    def make(broker: Broker, client_id: str, topic: str, qos: int) -> Subscriber:
        return AiomqttSubscriber(broker, client_id, topic, qos, protocol=protocol)
    return make


# -- publishers ---------------------------------------------------------------

def _connect_and_wait(client: mqtt.Client, host: str, port: int, timeout: float = 30) -> None:
    """Connect and start the loop; return once the CONNACK is in, so that no
    payload is time-stamped while the connection is still being set up."""
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect(host, port)
    sock = client.socket()
    if sock is not None:
        # paho leaves Nagle on: a QoS 0 stream (nothing comes back to carry the
        # ACKs) would then stall ~40 ms behind delayed ACKs and skew latency.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise RuntimeError(f"no CONNACK from {host}:{port} in {timeout}s")


def publish_backlog(
    broker: Broker, topic: str | Callable[[int], str], n: int, *, qos: int = 1,
    payload_size: int = DEFAULT_PAYLOAD_SIZE, window: int = 1000, timeout: float = 120,
) -> float:
    """Publish ``n`` messages as fast as the broker acknowledges them; return msgs/s.

    ``topic`` may be a function of the sequence number (messages spread over several topics).
    With QoS 1 each PUBACK means the message sits in every subscribed session.
    """
    topic_of = topic if callable(topic) else (lambda seq: topic)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    acked = 0
    all_acked = threading.Event()

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            all_acked.set()

    client.on_publish = on_publish
    _connect_and_wait(client, broker.host, broker.port)
    start = time.perf_counter()
    try:
        for seq in range(n):
            client.publish(topic_of(seq), make_payload(seq, payload_size), qos)
        if n and not all_acked.wait(timeout):
            raise RuntimeError(f"backlog: only {acked} of {n} messages acknowledged in {timeout}s")
        return n / (time.perf_counter() - start)
    finally:
        client.disconnect()
        client.loop_stop()


def publish_stream(
    host: str, port: int, topic: str, n: int, qos: int, rate: float | None,
    payload_size: int = DEFAULT_PAYLOAD_SIZE, timeout: float = 120,
) -> None:
    """Publish ``n`` messages at ``rate`` per second (None: as fast as possible).

    :func:`live_stream` runs it in its own interpreter
    (``python -m bench.raw_clients _publish ...``).
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    sent = 0
    all_sent = threading.Event()

    def on_publish(*_: object) -> None:
        nonlocal sent
        sent += 1
        if sent == n:
            all_sent.set()

    client.on_publish = on_publish
    _connect_and_wait(client, host, port)
    try:
        start = time.perf_counter()
        for seq in range(n):
            if rate:
                ahead = start + seq / rate - time.perf_counter()
                if ahead > 0.001:
                    time.sleep(ahead)
            client.publish(topic, make_payload(seq, payload_size), qos)
        if not all_sent.wait(timeout):
            raise RuntimeError(f"stream: only {sent} of {n} messages sent")
    finally:
        client.disconnect()
        client.loop_stop()


# -- measurements -------------------------------------------------------------

def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def drain_backlog(
    broker: Broker, subscriber_factory: SubscriberFactory, n: int, *,
    qos: int = 1, payload_size: int = DEFAULT_PAYLOAD_SIZE, timeout: float = 300,
) -> Recorder:
    """Queue ``n`` messages for an offline persistent session, then time its drain.

    The broker must queue at least ``n`` messages per client (MosquittoServer's
    ``max_queued``). ``recorder.rate`` is the consumer's msgs/s.
    """
    topic = _unique("bench/drain")
    subscriber = subscriber_factory(broker, _unique("bench-drain"), topic, qos)
    subscriber.register()
    publish_backlog(broker, topic, n, qos=qos, payload_size=payload_size)
    recorder = Recorder(n)
    recorder.mark_published()
    subscriber.consume(recorder, timeout)
    return recorder


def live_stream(
    broker: Broker, subscriber_factory: SubscriberFactory, n: int, *,
    qos: int = 1, rate: float | None = None, payload_size: int = DEFAULT_PAYLOAD_SIZE,
    timeout: float = 300, idle: float = 5.0,
) -> Recorder:
    """Publish ``n`` messages from a separate process while the subscriber consumes.

    ``rate=None`` floods (throughput and loss); a moderate rate gives latency.
    """
    topic = _unique("bench/live")
    subscriber = subscriber_factory(broker, _unique("bench-live"), topic, qos)
    subscriber.register()
    recorder = Recorder(n)
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            subscriber.consume(recorder, timeout)
        except BaseException as exc:  # reported by the caller below
            failure.append(exc)
            recorder.ready.set()

    consumer = threading.Thread(target=consume, name="bench-consumer", daemon=True)
    consumer.start()
    if not recorder.ready.wait(60) or failure:
        raise RuntimeError(f"subscriber never became ready: {failure}")
    # A separate interpreter, so the publisher does not compete with the
    # subscriber for the GIL; started by command so importers need no __main__.
    cmd = [
        sys.executable, "-m", "bench.raw_clients", "_publish", broker.host, str(broker.port),
        topic, str(n), str(qos), str(rate or 0), str(payload_size), str(timeout),
    ]
    try:
        publisher = subprocess.run(cmd, cwd=REPO_ROOT, timeout=timeout + 30, capture_output=True, text=True)
    finally:
        recorder.mark_published()
    if publisher.returncode != 0:
        raise RuntimeError(f"publisher exited with {publisher.returncode}: {publisher.stderr[-2000:]}")
    consumer.join(timeout + idle + 10)
    if failure:
        raise failure[0]
    return recorder


# -- command line -------------------------------------------------------------

@dataclass
class Row:
    client: str
    qos: int
    rate: float
    loss: int
    p50: float
    p99: float


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure(
    broker: Broker, name: str, factory: SubscriberFactory, args: argparse.Namespace,
    log: Callable[[str], None],
) -> list[Row]:
    """One repeat of every measurement for one client."""
    drain = drain_backlog(broker, factory, args.count, qos=1, payload_size=args.payload_size)
    flood = live_stream(broker, factory, args.count, qos=0, rate=None, payload_size=args.payload_size, idle=3)
    lat1 = live_stream(broker, factory, args.live_count, qos=1, rate=args.rate, payload_size=args.payload_size)
    lat0 = live_stream(broker, factory, args.live_count, qos=0, rate=args.rate, payload_size=args.payload_size, idle=3)
    log(
        f"  {name}: qos1 drain {drain.rate:,.0f}/s (lost {drain.lost}, dup {drain.duplicates}); "
        f"qos0 flood {flood.rate:,.0f}/s lost {flood.lost}; "
        f"latency qos1 p50 {lat1.percentile_ms(50):.2f} p99 {lat1.percentile_ms(99):.2f} ms "
        f"(lost {lat1.lost}), qos0 p50 {lat0.percentile_ms(50):.2f} p99 {lat0.percentile_ms(99):.2f} ms"
    )
    return [
        Row(name, 1, drain.rate, drain.lost, lat1.percentile_ms(50), lat1.percentile_ms(99)),
        Row(name, 0, flood.rate, flood.lost, lat0.percentile_ms(50), lat0.percentile_ms(99)),
    ]


def format_table(rows: list[Row], baseline: str) -> str:
    """A markdown table; ``rows`` hold medians. Ratio is msgs/s against ``baseline``."""
    base = {r.qos: r.rate for r in rows if r.client == baseline}
    lines = [
        "| client | qos | msgs/s | lost | p50 ms | p99 ms | vs raw paho |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (-r.qos, r.client != baseline)):
        ratio = r.rate / base[r.qos] if base.get(r.qos) else float("nan")
        lines.append(
            f"| {r.client} | {r.qos} | {r.rate:,.0f} | {r.loss} | {r.p50:.2f} | {r.p99:.2f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def _mosquitto_version() -> str:
    out = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_publish"]:
        host, port, topic, n, qos, rate, size, timeout = argv[1:9]
        publish_stream(host, int(port), topic, int(n), int(qos), float(rate) or None, int(size), float(timeout))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages per drain/flood run")
    parser.add_argument("--live-count", type=int, default=3_000, help="messages per latency run")
    parser.add_argument("--rate", type=float, default=1_000, help="msgs/s of the latency stream")
    parser.add_argument("--payload-size", type=int, default=DEFAULT_PAYLOAD_SIZE)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--protocol", type=int, choices=(4, 5), default=5, help="4 = MQTT 3.1.1")
    parser.add_argument("--clients", default="paho,paho-manual-ack,aiomqtt")
    parser.add_argument("--broker-conf", default="", help='extra mosquitto.conf lines, e.g. "set_tcp_nodelay true"')
    args = parser.parse_args(argv)

    clients: dict[str, SubscriberFactory] = {
        "paho": paho_factory(protocol=args.protocol),
        "paho-manual-ack": paho_factory(manual_ack=True, protocol=args.protocol),
        "aiomqtt": aiomqtt_factory(protocol=args.protocol),
    }
    chosen = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = set(chosen) - clients.keys()
    if unknown:
        parser.error(f"unknown clients {sorted(unknown)}; choose from {sorted(clients)}")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    runs: dict[tuple[str, int], list[Row]] = {}
    with MosquittoServer(max_queued=max(100_000, 2 * args.count), extra_conf=args.broker_conf) as broker:
        for rep in range(args.repeat):
            log(f"repeat {rep + 1}/{args.repeat}")
            for name in chosen:
                for row in measure(broker, name, clients[name], args, log):
                    runs.setdefault((row.client, row.qos), []).append(row)
        broker.cleanup()

    medians = [
        Row(client, qos, _median([r.rate for r in rs]), max(r.loss for r in rs),
            _median([r.p50 for r in rs]), _median([r.p99 for r in rs]))
        for (client, qos), rs in runs.items()
    ]
    print(
        f"Raw MQTT clients on a private {_mosquitto_version()}, MQTT "
        f"{'5' if args.protocol == 5 else '3.1.1'}, {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}, paho-mqtt {version('paho-mqtt')}, aiomqtt {version('aiomqtt')}, "
        f"median of {args.repeat}.\n"
        f"QoS 1 msgs/s: drain of a {args.count:,}-message backlog (first to last message). "
        f"QoS 0 msgs/s: live flood of {args.count:,} from another process (lost = worst run). "
        f"p50/p99: publish-to-callback latency at {args.rate:,.0f} msgs/s, {args.live_count:,} messages; "
        f"payload {args.payload_size} B. "
        f"Broker defaults (max_inflight 20, no TCP_NODELAY) except max_queued; publisher sockets TCP_NODELAY"
        f"{'; extra conf: ' + args.broker_conf if args.broker_conf else ''}.\n"
    )
    print(format_table(medians, baseline="paho"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
