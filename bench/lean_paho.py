"""A lean raw paho subscriber in its own process: the baseline of `bench/bench_core.py`.

Run by the benchmark, not by hand:

    python -m bench.lean_paho register HOST PORT CLIENT_ID TOPIC QOS PROTOCOL
    python -m bench.lean_paho consume  HOST PORT CLIENT_ID TOPIC QOS PROTOCOL EXPECTED OUT

`register` creates a persistent session subscribed to TOPIC and leaves; `consume` resumes it and
serves messages in paho's own network loop (`loop_forever` on the main thread) with automatic
acknowledgement, handing each payload to the same `bench.apps.tally.Tally` as the framework's
app (one `json.loads` per message, which the framework does too). It prints "subscribed" to
stderr once the SUBACK is in. PROTOCOL is 4 (MQTT 3.1.1) or 5.
"""

from __future__ import annotations

import os
import sys
import threading

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO_ROOT)

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.apps.tally import Tally

SESSION_EXPIRY = 300


def _client(client_id: str, protocol: int, clean: bool) -> tuple[mqtt.Client, dict[str, object]]:
    if protocol == 5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY
        return client, {"clean_start": clean, "properties": props}
    # 3.1.1: a session outlives the connection only without clean session, also when registering it.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False)
    return client, {}


def main(argv: list[str]) -> int:
    mode, host, port, client_id, topic, qos, protocol = argv[:7]
    client, connect_args = _client(client_id, int(protocol), clean=mode == "register")
    subscribed = threading.Event()

    def on_subscribe(*_: object) -> None:
        subscribed.set()
        print("subscribed", file=sys.stderr, flush=True)
        if mode == "register":
            client.disconnect()

    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, int(qos))
    client.on_subscribe = on_subscribe
    if mode == "consume":
        tally = Tally(int(argv[7]), argv[8])
        record = tally.record_json
        client.on_message = lambda c, u, msg: record(msg.payload)
    client.connect(host, int(port), **connect_args)  # type: ignore[arg-type]
    client.loop_forever()  # until SIGTERM (consume) or our own DISCONNECT (register)
    return 0 if subscribed.is_set() else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
