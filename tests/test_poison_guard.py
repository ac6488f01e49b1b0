"""PoisonGuard's decisions on a paho client's outgoing queue, with a fake clock (no broker).

tests/integration/test_wire_broker.py runs it against Mosquitto; here each rule is pinned down.
"""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest

from core.transport.poison_guard import PoisonGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def queue(client: paho.Client, *mids: int, state: int = paho.mqtt_ms_wait_for_puback) -> list[paho.MQTTMessage]:
    messages = []
    for mid in mids:
        message = paho.MQTTMessage(mid, f"t/{mid}".encode())
        message.qos, message.state = 1, state
        client._out_messages[mid] = message
        messages.append(message)
    return messages


@pytest.fixture
def setup() -> tuple[paho.Client, PoisonGuard, Clock]:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(20)
    clock = Clock()
    return client, PoisonGuard(client, "test", 20, window=2.0, strikes=2, clock=clock), clock


def resend(client: paho.Client, guard: PoisonGuard) -> None:
    """What a reconnect does: paho resets its queue, the guard holds all but one back, CONNACK sends that one."""
    client._messages_reconnect_reset_out()
    guard.before_connack()
    for message in client._out_messages.values():
        if message.state == paho.mqtt_ms_publish:
            message.state = paho.mqtt_ms_wait_for_puback
    guard.connected()


def test_a_loss_long_after_sending_is_not_suspicious(setup: tuple[paho.Client, PoisonGuard, Clock]) -> None:
    client, guard, clock = setup
    guard.connected()
    queue(client, 1, 2)
    clock.now += 10
    assert guard.connection_lost() == [] and not guard.probing


def test_a_loss_right_after_a_resend_starts_probing_one_at_a_time(setup: tuple[paho.Client, PoisonGuard, Clock]) -> None:
    client, guard, clock = setup
    queue(client, 1, 2, 3)
    guard.connected()
    clock.now += 0.1
    assert guard.connection_lost() == []
    assert guard.probing and client._max_inflight_messages == 1
    resend(client, guard)
    states = [m.state for m in client._out_messages.values()]
    assert states == [paho.mqtt_ms_wait_for_puback, paho.mqtt_ms_queued, paho.mqtt_ms_queued]


def test_the_sole_suspect_of_consecutive_quick_losses_is_given_up(setup: tuple[paho.Client, PoisonGuard, Clock]) -> None:
    client, guard, clock = setup
    good, bad, later = queue(client, 1, 2, 3)
    guard.connected()
    assert guard.connection_lost() == []  # probing from now on
    resend(client, guard)
    guard.acknowledged(1)  # the first one was fine: paho drops it and sends the next
    del client._out_messages[1]
    bad.state = paho.mqtt_ms_wait_for_puback
    later.state = paho.mqtt_ms_queued
    clock.now += 0.05
    assert guard.connection_lost() == []  # strike 1 for mid 2
    resend(client, guard)
    clock.now += 0.05
    assert guard.connection_lost() == [bad]  # strike 2: given up, removed from paho's queue
    assert list(client._out_messages) == [3]
    assert guard.probing  # mid 3 was also in flight at the first loss: still resent alone
    resend(client, guard)
    guard.acknowledged(3)
    assert not guard.probing and client._max_inflight_messages == 20


def test_acknowledging_every_distrusted_message_ends_probing(setup: tuple[paho.Client, PoisonGuard, Clock]) -> None:
    client, guard, clock = setup
    queue(client, 1, 2)
    guard.connected()
    guard.connection_lost()
    resend(client, guard)
    guard.acknowledged(1)
    del client._out_messages[1]
    assert guard.probing
    guard.acknowledged(2)
    assert not guard.probing and client._max_inflight_messages == 20


def test_a_slow_loss_between_strikes_starts_the_count_again(setup: tuple[paho.Client, PoisonGuard, Clock]) -> None:
    client, guard, clock = setup
    queue(client, 1)
    guard.connected()
    guard.connection_lost()  # probing
    resend(client, guard)
    assert guard.connection_lost() == []  # strike 1
    resend(client, guard)
    clock.now += 5  # this connection lasted: not the message's fault
    assert guard.connection_lost() == []
    resend(client, guard)
    assert guard.connection_lost() == []  # strike 1 again, not 2
    assert list(client._out_messages) == [1]
