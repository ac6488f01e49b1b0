"""AckSequencer: acks leave in arrival order whatever order handlers finish in (MQTT-4.6.0-2)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from core.transport.acks import AckSequencer


def make() -> tuple[AckSequencer, list[tuple[int, int, int]]]:
    sent: list[tuple[int, int, int]] = []
    return AckSequencer(lambda mid, qos, gen: sent.append((mid, qos, gen))), sent


def test_in_order_completion_acks_immediately() -> None:
    seq, sent = make()
    a, b = seq.track(1, 1, 0), seq.track(2, 2, 0)
    seq.complete(a)
    assert sent == [(1, 1, 0)]
    seq.complete(b)
    assert sent == [(1, 1, 0), (2, 2, 0)]
    assert len(seq) == 0


def test_out_of_order_completion_waits_for_earlier_messages() -> None:
    seq, sent = make()
    tickets = [seq.track(mid, 1, 0) for mid in (10, 11, 12, 13)]
    seq.complete(tickets[2])
    seq.complete(tickets[1])
    assert sent == []  # 10 is still running
    seq.complete(tickets[0])
    assert [m for m, _, _ in sent] == [10, 11, 12]
    assert len(seq) == 1
    seq.complete(tickets[3])
    assert [m for m, _, _ in sent] == [10, 11, 12, 13]


@given(st.integers(min_value=1, max_value=60), st.randoms(use_true_random=False))
def test_any_completion_order_gives_arrival_order(n: int, rnd: random.Random) -> None:
    seq, sent = make()
    tickets = [seq.track(mid, 1, 0) for mid in range(1, n + 1)]
    order = list(tickets)
    rnd.shuffle(order)
    done: set[int] = set()
    for ticket in order:
        seq.complete(ticket)
        done.add(ticket.mid)
        acked = [m for m, _, _ in sent]
        # Acked = the longest finished prefix of the arrival order, never more.
        prefix = 0
        while prefix < n and (prefix + 1) in done:
            prefix += 1
        assert acked == list(range(1, prefix + 1))
    assert len(seq) == 0


def test_new_generation_drops_tickets_of_the_old_connection() -> None:
    seq, sent = make()
    old_blocker = seq.track(1, 1, 0)
    old_done = seq.track(2, 1, 0)
    seq.complete(old_done)
    assert sent == []
    # Reconnected: the broker redelivers 1 and 2 with new packet ids; old acks must not be sent.
    new = seq.track(5, 1, 1)
    assert len(seq) == 1
    seq.complete(new)
    assert sent == [(5, 1, 1)]
    seq.complete(old_blocker)  # the old handler finishes late
    assert sent == [(5, 1, 1)]
