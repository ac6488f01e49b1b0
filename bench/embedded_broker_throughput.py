"""How many QoS 1 messages per second the embedded broker forwards.

Run:  .venv/bin/python -m bench.embedded_broker_throughput [--count 5000] [--repeat 3]

One paho publisher and one paho subscriber (MQTT 3.1.1, QoS 1, auto-ack), with
the broker in this process's event loop as in the framework; the paho network
threads share the process, so the number is for the whole process. The rate
is first publish to last message received.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.transport.embedded_broker import EmbeddedBroker  # noqa: E402

HOST = "127.0.0.1"


def _client(port: int, client_id: str, inflight: int) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(inflight)
    client.connect(HOST, port)
    client.loop_start()
    return client


async def measure(count: int, inflight: int) -> float:
    """Messages per second for ``count`` QoS 1 messages, publisher to subscriber."""
    async with EmbeddedBroker(HOST, 0) as broker:
        done = threading.Event()
        received = 0

        def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
            nonlocal received
            received += 1
            if received == count:
                done.set()

        subscribed = threading.Event()
        sub = _client(broker.port, "bench-sub", inflight)
        sub.on_message = on_message
        sub.on_subscribe = lambda *_: subscribed.set()
        sub.subscribe("bench/data", 1)
        pub = _client(broker.port, "bench-pub", inflight)
        while not subscribed.is_set():
            await asyncio.sleep(0.01)

        payload = b"x" * 64
        start = time.perf_counter()
        for _ in range(count):
            pub.publish("bench/data", payload, 1)
        deadline = start + 120
        while not done.is_set() and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        for client in (pub, sub):
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
        if received < count:
            raise RuntimeError(f"only {received} of {count} messages arrived within 120 s")
        return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=100, help="paho max in-flight QoS 1 messages")
    args = parser.parse_args()
    rates = [asyncio.run(measure(args.count, args.inflight)) for _ in range(args.repeat)]
    print(f"embedded broker, QoS 1, {args.count} msgs, inflight {args.inflight}: "
          + ", ".join(f"{rate:,.0f}" for rate in rates) + " msgs/s")


if __name__ == "__main__":
    main()
