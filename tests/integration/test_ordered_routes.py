"""Ordered routes (issue 11, section 1) against a private Mosquitto, in one process.

The scenario measured in the issue: 20 device topics x 150 QoS 1 messages, interleaved, a handler
that awaits 0-3 ms. Without `ordered=True` consecutive messages of a topic finish out of order;
with it, none do, while different topics still run at the same time.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import pytest

from core.router import Router
from tests.integration.conftest import BrokerTarget, ProbeFn, ServeFn
from tests.support.rt_wait import wait_until

pytestmark = pytest.mark.timeout(120)

TOPICS, PER_TOPIC = 20, 150


class Recorder:
    """What a handler saw: per topic, the sequence numbers in the order they finished."""

    def __init__(self, seed: int) -> None:
        self.finished: dict[str, list[int]] = defaultdict(list)
        self.running: dict[str, int] = defaultdict(int)
        self.max_same_topic = 0  # most handlers of one topic running at once
        self.max_total = 0  # most handlers running at once
        self._total = 0
        self._rand = random.Random(seed)

    async def handle(self, device_id: str, payload: Any) -> None:
        self.running[device_id] += 1
        self._total += 1
        self.max_same_topic = max(self.max_same_topic, self.running[device_id])
        self.max_total = max(self.max_total, self._total)
        try:
            await asyncio.sleep(self._rand.uniform(0, 0.003))
            self.finished[device_id].append(int(payload["seq"]))
        finally:
            self.running[device_id] -= 1
            self._total -= 1

    def count(self) -> int:
        return sum(len(v) for v in self.finished.values())

    def out_of_order_pairs(self) -> int:
        return sum(1 for seqs in self.finished.values() for a, b in zip(seqs, seqs[1:]) if b < a)


async def run_scenario(ordered: bool, mosquitto: Any, serve: ServeFn, probe_factory: ProbeFn,
                       unique_id: str) -> Recorder:
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    recorder = Recorder(seed=11)
    router = Router()
    router.on(f"{unique_id}/devices/{{device_id}}/status", recorder.handle, qos=1, ordered=ordered)
    runtime = await serve(target, router, MAX_INFLIGHT="100")
    probe = await probe_factory(target)
    infos = []
    for seq in range(PER_TOPIC):
        for device in range(TOPICS):  # interleaved: d0 #0, d1 #0, ..., d19 #0, d0 #1, ...
            infos.append(probe.paho.publish(f"{unique_id}/devices/d{device}/status", f'{{"seq": {seq}}}', 1))
    total = TOPICS * PER_TOPIC
    await wait_until(lambda: all(info.is_published() for info in infos), "PUBACKs of the test messages", 60)
    await wait_until(lambda: recorder.count() >= total, f"{total} messages handled", 60)
    await wait_until(lambda: runtime.dispatcher.inflight == 0, "no handler in flight")
    assert recorder.count() == total
    for device in range(TOPICS):
        assert sorted(recorder.finished[f"d{device}"]) == list(range(PER_TOPIC))
    return recorder


async def test_unordered_route_finishes_one_topics_messages_out_of_order(
        mosquitto: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """Shows the check below can fail: the same scenario without ordered=True."""
    recorder = await run_scenario(False, mosquitto, serve, probe_factory, unique_id)
    assert recorder.out_of_order_pairs() > 0
    assert recorder.max_same_topic > 1


async def test_ordered_route_handles_each_topic_in_arrival_order(
        mosquitto: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    recorder = await run_scenario(True, mosquitto, serve, probe_factory, unique_id)
    assert recorder.out_of_order_pairs() == 0
    assert recorder.max_same_topic == 1  # one at a time per topic
    assert recorder.max_total > 1  # different topics still run concurrently


async def test_ordered_route_keeps_no_state_for_topics_no_longer_in_flight(
        mosquitto: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    seen: list[str] = []
    largest = over = 0  # most topics with state; most topics with state beyond the messages in flight

    router = Router()
    runtime: Any = None

    async def handle(device_id: str) -> None:
        nonlocal largest, over
        await asyncio.sleep(0)  # having waited once, this message counts as in flight too
        held = len(runtime.dispatcher.sequencer)
        largest, over = max(largest, held), max(over, held - runtime.dispatcher.inflight)
        seen.append(device_id)

    router.on(f"{unique_id}/many/{{device_id}}", handle, qos=1, ordered=True)
    runtime = await serve(target, router, MAX_INFLIGHT="50")
    probe = await probe_factory(target)
    tasks_before = len(asyncio.all_tasks())
    infos = [probe.paho.publish(f"{unique_id}/many/t{i}", b"x", 1) for i in range(3000)]
    await wait_until(lambda: len(seen) >= 3000 and all(i.is_published() for i in infos), "3000 distinct topics handled", 60)
    await wait_until(lambda: runtime.dispatcher.inflight == 0, "no handler in flight")
    assert sorted(seen) == sorted(f"t{i}" for i in range(3000))
    sequencer = runtime.dispatcher.sequencer
    assert len(sequencer) == 0 and sequencer.waiting() == 0  # nothing kept per topic once idle
    # While running: state only for topics with a message in flight, so bounded by MAX_INFLIGHT, not by 3000.
    assert over <= 0 and 0 < largest <= 50
    assert len(asyncio.all_tasks()) <= tasks_before  # no task left over per topic


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_retried_message_keeps_the_later_ones_of_its_topic_waiting(
        ordered: bool, mosquitto: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    attempts: dict[int, int] = defaultdict(int)
    finished: list[int] = []
    runtime: Any = None

    def second_is_in() -> bool:
        """Message 2 started (unordered) or waits behind message 1 (ordered)."""
        sequencer = runtime.dispatcher.sequencer
        return attempts[2] > 0 or (sequencer is not None and sequencer.waiting() > 0)

    async def handle(payload: Any) -> None:
        seq = int(payload["seq"])
        attempts[seq] += 1
        if seq == 1 and attempts[seq] == 1:
            await wait_until(second_is_in, "the second message started or waiting for its turn")
            raise RuntimeError("first attempt fails")
        finished.append(seq)

    router = Router()
    router.on(f"{unique_id}/dev/{{device_id}}", handle, qos=1, ordered=ordered, retries=2, retry_backoff=0)
    runtime = await serve(target, router)
    probe = await probe_factory(target)
    for seq in (1, 2):
        await probe.publish(f"{unique_id}/dev/d1", {"seq": seq})
    await wait_until(lambda: len(finished) == 2, "both messages handled")
    assert attempts == {1: 2, 2: 1}
    assert finished == ([1, 2] if ordered else [2, 1])
