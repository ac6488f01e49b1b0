"""The events feed and the recent dead letters (core/runtime/events.py) and how the status page shows them."""

from __future__ import annotations

import re
import threading
from typing import Any, Iterator

import pytest

from core.runtime import events
from core.runtime.events import (
    DEAD_LETTER_CAPACITY, EVENT_CAPACITY, TEXT_LIMIT, FeedCursor, ingest_from_worker, recent_dead_letters,
    recent_events, record_dead_letter, record_event,
)
from core.operations.status_page import render_fragment


@pytest.fixture(autouse=True)
def empty_feeds() -> Iterator[None]:
    events.EVENTS.clear()
    events.DEAD_LETTERS.clear()
    yield
    events.EVENTS.clear()
    events.DEAD_LETTERS.clear()


def test_record_event_newest_first_with_time_kind_text_source() -> None:
    record_event("autoscale", "2 -> 3 workers: backlog 500")
    record_event("adoption", "took over replica-b", source="replica-a")
    newest, older = recent_events()
    assert (newest["kind"], newest["text"], newest["source"]) == ("adoption", "took over replica-b", "replica-a")
    assert (older["kind"], older["text"], older["source"]) == ("autoscale", "2 -> 3 workers: backlog 500", "")
    assert newest["time"] >= older["time"] > 0
    assert recent_events(1) == [newest]


def test_record_event_rejects_an_empty_kind() -> None:
    with pytest.raises(ValueError, match="kind must be a non-empty string"):
        record_event(" ", "x")
    with pytest.raises(ValueError, match="kind"):
        record_event(None, "x")  # type: ignore[arg-type]


def test_feeds_are_bounded_in_count_and_text_length() -> None:
    for i in range(EVENT_CAPACITY + 25):
        record_event("restart", f"event {i} " + "x" * (TEXT_LIMIT * 2))
    for i in range(DEAD_LETTER_CAPACITY + 5):
        record_dead_letter(f"t/{i}", "t/{n}", "RuntimeError", "boom")
    got = recent_events()
    assert len(got) == EVENT_CAPACITY
    assert got[0]["text"].startswith(f"event {EVENT_CAPACITY + 24} ") and got[-1]["text"].startswith("event 25 ")
    assert all(len(e["text"]) == TEXT_LIMIT for e in got)
    dead = recent_dead_letters()
    assert len(dead) == DEAD_LETTER_CAPACITY and dead[0]["topic"] == f"t/{DEAD_LETTER_CAPACITY + 4}"


def test_record_event_from_many_threads_loses_nothing() -> None:
    def record(n: int) -> None:
        for i in range(20):
            record_event("thread", f"{n}-{i}")

    threads = [threading.Thread(target=record, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = recent_events()
    assert len(got) == 160 and len({e["seq"] for e in got}) == 160


def test_a_worker_sends_each_entry_once_and_the_supervisor_tags_it() -> None:
    cursor = FeedCursor()
    assert cursor.take() == {}
    record_dead_letter("ops/d1/data", "ops/{device_id}/data", "PayloadError", "value: field required")
    record_event("recycle", "w1 recycled")
    sent = cursor.take()
    assert [d["topic"] for d in sent["dead_letters"]] == ["ops/d1/data"]
    assert [e["text"] for e in sent["events"]] == ["w1 recycled"]
    assert cursor.take() == {}  # nothing new: the heartbeat carries nothing more
    record_event("restart", "again")
    assert list(cursor.take()) == ["events"]

    # The supervisor's feeds (here the same module; in production another process's).
    events.EVENTS.clear()
    events.DEAD_LETTERS.clear()
    ingest_from_worker({"type": "hb", **sent}, "w1")
    (dead,) = recent_dead_letters()
    assert (dead["topic"], dead["route"], dead["error"], dead["source"]) == (
        "ops/d1/data", "ops/{device_id}/data", "PayloadError: value: field required", "w1")
    assert recent_events()[0]["source"] == "w1"


def _data(**extra: Any) -> dict[str, Any]:
    return {
        "ready": True, "reasons": [], "profile": {"name": None, "explicit": []}, "mode": "single", "pid": 1, "uptime": 3.0, "checks": {},
        "broker": {"host": "h", "port": 1, "embedded": False, "connected": 1, "clients": 1},
        "totals": dict.fromkeys(("received", "handled", "failed", "dead_lettered", "unrouted"), 0),
        "processes": [], "routes": [], "backlog": {}, "dead_letters": recent_dead_letters(), "events": recent_events(),
        **extra,
    }


def test_the_page_lists_dead_letters_and_events_escaped() -> None:
    assert 'id="dead-letters" class="meta">none since start' in render_fragment(_data())
    record_dead_letter("a/<b>", "a/{x}", "ValueError", "bad & worse")
    record_event("autoscale", "<3 workers>")
    html = render_fragment(_data())
    row = re.search(r'<tr class="dead-letter">(.*?)</tr>', html).group(1)  # type: ignore[union-attr]
    assert "<code>a/&lt;b&gt;</code>" in row and "<code>a/{x}</code>" in row
    assert "ValueError: bad &amp; worse" in row and '<td class="source">main</td>' in row
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"', row)
    assert re.search(r'<li class="event" data-kind="autoscale">.*&lt;3 workers&gt;</li>', html)


def test_entries_from_a_worker_are_listed_by_when_they_happened() -> None:
    record_dead_letter("local/late", "r", "E", "")
    ingest_from_worker({"dead_letters": [{"time": 1.0, "topic": "w/early", "route": "r", "error": "E"}]}, "w0")
    assert [d["topic"] for d in recent_dead_letters()] == ["local/late", "w/early"]
