"""A fleet of pods (`python main.py --workers 2` each, distinct MQTT_CLIENT_ID, one MQTT_GROUP_NAME)
loses no QoS 1 message when pods go away (issue 8): rolling update with new names, scale-down,
SIGKILL of a whole pod, node loss, the whole fleet restarted with new names, a worker count
change in place, and an adoption racing the owner's return.

Each scenario runs on its own private Mosquitto with a short orphan grace (MQTT_ORPHAN_GRACE=2),
publishes a bounded QoS 1 stream while pods come and go, and counts lost and duplicate sequence
numbers from the records file the seqapp handlers write. A message counts as lost if it is not
handled within a bound after the stream ended: parked in a departed pod's session, it would only
be discarded when the session expires (MQTT_SESSION_EXPIRY, 300 s here).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.integration.test_workers import AppProcess, Publisher, Records, app_env, report, wait_for
from tests.support.servers import MosquittoServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

GRACE = "2"
STREAM = range(3000)
RATE = 300.0  # messages/s: the stream lasts 10 s
SETTLE = 45.0  # seconds after the stream for every message to be handled


@pytest.fixture
def broker(mosquitto_factory: Callable[..., MosquittoServer]) -> MosquittoServer:
    return mosquitto_factory(max_queued=100_000)


class Fleet:
    """Pods of one app on one broker: `pod(name)` starts `python main.py --workers N` as MQTT_CLIENT_ID=name."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp = tmp
        self.port = port
        self.records = Records(tmp / "records.txt")
        self.pods: list[AppProcess] = []

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return app_env(self.tmp, self.port, MQTT_CLIENT_ID=name, MQTT_ORPHAN_GRACE=GRACE, SEQAPP_NO_PLAIN="1", STATS_INTERVAL="60",
                       SHUTDOWN_TIMEOUT="5", **extra)

    def pod(self, name: str, workers: int = 2, **extra: str) -> AppProcess:
        """`workers=0`: `python main.py` alone (every route in one process)."""
        args = ["--workers", str(workers)] if workers else []
        app = AppProcess(self.tmp, self.env(name, **extra), args, name=f"{name}-{len(self.pods)}")
        self.pods.append(app)
        return app

    def stop(self, app: AppProcess) -> None:
        app.signal(signal.SIGTERM)
        assert app.wait(30) == 0, app.log()[-3000:]

    def kill(self, app: AppProcess) -> None:
        """SIGKILL every process of the pod (supervisor and workers), as a node loss does."""
        pids = [int(p) for p in re.findall(r"started worker w\d+ \(pid (\d+)", app.log())]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        app.signal(signal.SIGKILL)
        app.wait(10)

    def cleanup(self) -> None:
        for app in self.pods:
            app.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {app.log_path.name}\n{app.log()[-2500:]}" for app in self.pods)


@pytest.fixture
def fleet(broker: MosquittoServer, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, broker.port)
    try:
        yield fleet
    finally:
        fleet.cleanup()


class Stream:
    """A paced QoS 1 stream of STREAM in the background."""

    def __init__(self, port: int) -> None:
        self.publisher = Publisher(port)
        self.started = time.monotonic()
        self.publisher.publish_in_background(STREAM, rate=RATE)

    def at(self, seconds: float) -> None:
        """Wait until `seconds` into the stream (the stream's own pace, not a precondition)."""
        left = self.started + seconds - time.monotonic()
        if left > 0:
            time.sleep(left)

    def finish(self) -> None:
        self.publisher.join(60)
        self.publisher.close()


def settle(fleet: Fleet, name: str) -> tuple[int, int]:
    """Wait (bounded) until every message was handled; (lost, duplicates), printed for the report."""
    try:
        fleet.records.wait_handled(STREAM, timeout=SETTLE)
    except AssertionError:
        pass
    lost, duplicates = report(name, fleet.records.seqs(), STREAM)
    return lost, duplicates


def start_two(fleet: Fleet, a: str = "pod-a", b: str = "pod-b", workers: int = 2) -> tuple[AppProcess, AppProcess]:
    first, second = fleet.pod(a, workers), fleet.pod(b, workers)
    first.wait_ready(workers)
    second.wait_ready(workers)
    return first, second


def test_rolling_update_with_new_pod_names_loses_nothing(broker: MosquittoServer, fleet: Fleet) -> None:
    a, b = start_two(fleet)
    stream = Stream(broker.port)
    stream.at(2)
    fleet.stop(a)  # a Deployment: SIGTERM, and a pod with a new name replaces it
    fleet.pod("pod-c").wait_ready(2)
    stream.at(5)
    fleet.stop(b)
    fleet.pod("pod-d").wait_ready(2)
    stream.finish()
    lost, _ = settle(fleet, "rolling update, new names")
    assert lost == 0, fleet.logs()


@pytest.mark.parametrize("how", ["scale-down", "sigkill", "node-loss"])
def test_a_pod_gone_for_good_loses_nothing(broker: MosquittoServer, fleet: Fleet, how: str) -> None:
    """scale-down: SIGTERM, never back; sigkill: all its processes SIGKILLed, never back;
    node-loss: all SIGKILLed and a pod with a new name started."""
    a, b = start_two(fleet)
    stream = Stream(broker.port)
    stream.at(3)
    if how == "scale-down":
        fleet.stop(b)
    else:
        fleet.kill(b)
    if how == "node-loss":
        fleet.pod("pod-c").wait_ready(2)
    stream.finish()
    lost, _ = settle(fleet, how)
    assert lost == 0, fleet.logs()
    assert any(re.search(r"adopted the session of pod-b-w\d", pod.log()) for pod in fleet.pods), fleet.logs()


def test_single_process_pods_scale_down_loses_nothing(broker: MosquittoServer, fleet: Fleet) -> None:
    a, b = fleet.pod("pod-a", 0), fleet.pod("pod-b", 0)
    a.wait_log("subscribed to")
    b.wait_log("subscribed to")
    stream = Stream(broker.port)
    stream.at(3)
    fleet.stop(b)
    stream.finish()
    lost, _ = settle(fleet, "single-process pods, scale-down")
    assert lost == 0, fleet.logs()
    assert re.search(r"adopted the session of pod-b:", a.log()), a.log()[-3000:]


def test_whole_fleet_stopped_and_started_with_new_names_loses_nothing(broker: MosquittoServer, fleet: Fleet) -> None:
    a, b = start_two(fleet)
    stream = Stream(broker.port)
    stream.at(2)
    fleet.stop(a)
    fleet.stop(b)
    stream.at(6)  # nobody is up: everything published meanwhile is parked in the old sessions
    c, d = start_two(fleet, "pod-c", "pod-d")
    stream.finish()
    lost, _ = settle(fleet, "whole fleet restarted, new names")
    assert lost == 0, fleet.logs()


def test_worker_count_change_in_place_loses_nothing(broker: MosquittoServer, fleet: Fleet) -> None:
    a, b = start_two(fleet)
    stream = Stream(broker.port)
    stream.at(3)
    fleet.stop(b)
    fleet.pod("pod-b", workers=1).wait_ready(1)  # same name, one worker fewer
    stream.finish()
    lost, _ = settle(fleet, "worker count 2 -> 1 in place")
    assert lost == 0, fleet.logs()


def test_an_adoption_racing_the_owners_return_loses_nothing(broker: MosquittoServer, fleet: Fleet) -> None:
    # The adopter's handlers take 5 s each, so it is still draining pod-b-w0's session (hundreds
    # parked, at most MAX_INFLIGHT=100 at a time) when the owner comes back and takes it over.
    a, b = fleet.pod("pod-a", 1, SEQAPP_ADOPT_DELAY="5"), fleet.pod("pod-b", 1)
    a.wait_ready(1)
    b.wait_ready(1)
    stream = Stream(broker.port)
    stream.at(2)
    fleet.stop(b)
    a.wait_log(r"adopting the session of pod-b-w0", timeout=30)
    wait_for(lambda: fleet.records.by_worker()["adopted"] >= 1, "the adoption to handle a parked message")
    back = fleet.pod("pod-b", workers=1)
    back.wait_ready(1)
    stream.finish()
    lost, _ = settle(fleet, "adoption racing the owner's return")
    assert lost == 0, fleet.logs()
    # It notices the takeover when it reads from the socket again (its handlers hold it back meanwhile).
    a.wait_log(r"lost the session of pod-b-w0 while draining it", timeout=30)
    assert not re.search(r"adopted the session of pod-b-w0", a.log())


def test_an_adopter_killed_mid_drain_leaves_the_rest_to_another_replica(broker: MosquittoServer, fleet: Fleet) -> None:
    # Three pods; pod-c stops for good. Whichever of pod-a / pod-b adopts pod-c-w0 is SIGKILLed
    # while draining it (its handlers take 0.2 s each): its orphan notice for pod-c-w0 fires again
    # and the remaining pod adopts what is left, and the killed pod's own sessions too.
    pods = {name: fleet.pod(name, 1, SEQAPP_ADOPT_DELAY="0.2") for name in ("pod-a", "pod-b", "pod-c")}
    for pod in pods.values():
        pod.wait_ready(1)
    stream = Stream(broker.port)
    stream.at(2)
    fleet.stop(pods["pod-c"])
    adopter = wait_for(lambda: next((name for name in ("pod-a", "pod-b")
                                     if "adopting the session of pod-c-w0" in pods[name].log()), None),
                       "an adoption of pod-c-w0")
    wait_for(lambda: fleet.records.by_worker()["adopted"] >= 1, "the adoption to handle a parked message")
    fleet.kill(pods[adopter])
    survivor = pods["pod-b" if adopter == "pod-a" else "pod-a"]
    stream.finish()
    lost, _ = settle(fleet, "adopter SIGKILLed mid-drain")
    assert lost == 0, fleet.logs()
    survivor.wait_log(r"adopted the session of pod-c-w0", timeout=30)


def test_a_lone_app_back_after_the_grace_collects_its_own_sessions(broker: MosquittoServer, fleet: Fleet) -> None:
    first = fleet.pod("pod-a")
    first.wait_ready(2)
    fleet.stop(first)
    publisher = Publisher(broker.port)
    publisher.publish(STREAM)  # parked in pod-a's worker sessions
    publisher.close()
    wait_for(lambda: len(retained_notices(broker.port)) >= 2, "pod-a's orphan notices (the grace ran out)")
    again = fleet.pod("pod-a")
    lost, duplicates = settle(fleet, "lone app back after the grace")
    assert lost == 0 and duplicates == 0
    assert set(fleet.records.by_worker()) == {"w0", "w1"}  # its own workers, no adoption
    assert "adopting" not in again.log()
    wait_for(lambda: not retained_notices(broker.port), "the notices cleared by their owners")


def retained_notices(port: int) -> dict[str, bytes]:
    """The retained orphan notices on the broker now (topic -> payload)."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    found: dict[str, bytes] = {}
    done = threading.Event()
    marker = f"notice-probe/{time.time_ns()}"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.time_ns()}", protocol=paho.MQTTv5)

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        if message.topic == marker:
            done.set()
        elif message.retain and message.payload:
            found[message.topic] = message.payload

    def on_subscribe(c: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
        c.publish(marker, b"", qos=1)  # queued behind the retained notices the subscription brought

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe([("_orphans/workers/+", 0), (marker, 0)])
        assert done.wait(10), "no marker back"
    finally:
        client.disconnect()
        client.loop_stop()
    return found


async def test_two_adopters_of_one_session_only_the_last_ends_it_after_handling_everything(
        mosquitto_factory: Callable[..., MosquittoServer]) -> None:
    """A second adopter takes the session over mid-drain: the first gives up without ending it
    (no reconnect), the second handles what is left behind its own marker and ends it."""
    import asyncio
    from collections import Counter

    from bootstrap.app import Application
    from core.foundation.config import load_settings
    from core.router import Router
    from core.worker_manager import ParkedSessions
    from tests.integration.test_workers import session_present
    from tests.support.rt_wait import wait_until

    server = mosquitto_factory(max_queued=100_000)
    orphan = "gone-w0"
    # The orphan: a worker session subscribed to the group, then gone; 400 messages parked in it.
    assert _persistent_subscription(server.port, orphan, "$share/workers/seq/in")
    publisher = Publisher(server.port)
    publisher.publish(range(400))
    publisher.close()

    handled: Counter[int] = Counter()

    async def handle(payload: str) -> None:
        await asyncio.sleep(0.05)
        handled[int(payload)] += 1

    router = Router()
    router.on("seq/in", handle, qos=1, shared=True, payload_format="text")

    def adopter(name: str) -> ParkedSessions:
        settings = load_settings({"MQTT_BROKER": "127.0.0.1", "MQTT_PORT": str(server.port), "MQTT_CLIENT_ID": name,
                                  "MAX_INFLIGHT": "10", "MQTT_ORPHAN_GRACE": "2", "SHUTDOWN_TIMEOUT": "5"})
        return ParkedSessions(Application.load(settings, router), first=0)

    first = asyncio.create_task(adopter("adopter-1").adopt(orphan))
    await wait_until(lambda: sum(handled.values()) >= 50, "the first adopter to handle some parked messages")
    second = await adopter("adopter-2").adopt(orphan)
    first_outcome = await first
    print(f"two adopters: 400 parked, {400 - len(handled)} lost, {sum(handled.values()) - len(handled)} duplicates")
    assert first_outcome["state"] == "lost", first_outcome
    assert second["state"] == "ended", second
    assert set(handled) == set(range(400))
    assert not session_present(server.port, orphan)


def _persistent_subscription(port: int, client_id: str, topic: str) -> bool:
    """Connect as `client_id` with a persistent session, subscribe to `topic`, go away (session kept)."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.on_subscribe = lambda *args: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    client.connect("127.0.0.1", port, clean_start=True, properties=props)
    client.loop_start()
    client.subscribe(topic, qos=1)
    ok = subscribed.wait(10)
    client.disconnect()
    client.loop_stop()
    return ok
