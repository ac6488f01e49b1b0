"""The operator's events feed and the recent dead letters, shown on the status page.

Record a decision a subsystem took, in one line, from anywhere in the app (any process, any
thread)::

    from core.runtime.events import record_event

    record_event("autoscale", "4 -> 6 workers: backlog 1200 entries for 30 s")
    record_event("adoption", "took over the session of replica app-2 (no heartbeat for 20 s)")

`kind` is a short lowercase word the page shows as a tag (e.g. "autoscale", "adoption",
"restart", "recycle"); `text` says what happened and why, for a human. Record decisions, not
per-message happenings: the feed keeps the last `EVENT_CAPACITY` events of the process and is
meant to be read by a person. `record_event` does not log; log as you already do.

Events and dead letters recorded in a worker process reach the supervisor with the next heartbeat
(`FeedCursor`), where the page reads them, tagged with the worker's id. Memory is bounded: both
feeds are ring buffers with texts cut at `TEXT_LIMIT` characters.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Iterable

EVENT_CAPACITY = 200
DEAD_LETTER_CAPACITY = 50
TEXT_LIMIT = 500
_KIND_LIMIT = 40


class Feed:
    """A bounded, thread-safe ring of plain dict entries, each with a per-process sequence number."""

    def __init__(self, capacity: int) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, entry: dict[str, Any]) -> None:
        with self._lock:
            entry["seq"] = next(self._seq)
            self._entries.append(entry)

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest entries first (copies), by the time they happened: a worker's arrive a heartbeat late."""
        with self._lock:
            entries = sorted(self._entries, key=lambda e: (e.get("time", 0), e["seq"]), reverse=True)
        return [dict(e) for e in (entries if limit is None else entries[:limit])]

    def since(self, seq: int) -> list[dict[str, Any]]:
        """Entries recorded after sequence number `seq`, oldest first."""
        with self._lock:
            if not self._entries or self._entries[-1]["seq"] <= seq:
                return []
            return [dict(e) for e in self._entries if e["seq"] > seq]

    def ingest(self, entries: Iterable[dict[str, Any]], source: str) -> None:
        """Add entries another process recorded (from its heartbeat), tagged with `source`."""
        for entry in entries:
            if isinstance(entry, dict):
                copy = {k: v for k, v in entry.items() if k != "seq"}
                copy["source"] = copy.get("source") or source
                self.add(copy)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


EVENTS = Feed(EVENT_CAPACITY)
DEAD_LETTERS = Feed(DEAD_LETTER_CAPACITY)


def _cut(text: Any, limit: int = TEXT_LIMIT) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_event(kind: str, text: str, *, source: str = "") -> None:
    """Add one line to the operator's events feed (see the module docstring for what to record).

    `source` names where it happened when that is not this process (e.g. a replica's id); in a
    worker the supervisor fills in the worker's id.
    """
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError(f"record_event: kind must be a non-empty string, got {kind!r}")
    EVENTS.add({"time": time.time(), "kind": _cut(kind.strip(), _KIND_LIMIT), "text": _cut(text),
                "source": _cut(source, _KIND_LIMIT)})


def recent_events(limit: int | None = None) -> list[dict[str, Any]]:
    """The newest events first: dicts with time (epoch seconds), kind, text, source, seq."""
    return EVENTS.recent(limit)


def record_dead_letter(topic: str, route: str, error_type: str, error: str) -> None:
    """Remember a dead letter for the status page (called by the dispatcher, once per dead letter)."""
    DEAD_LETTERS.add({"time": time.time(), "topic": _cut(topic, 300), "route": route,
                      "error": _cut(f"{error_type}: {error}" if error else error_type), "source": ""})


def recent_dead_letters(limit: int | None = None) -> list[dict[str, Any]]:
    """The newest dead letters first: dicts with time, topic, route, error, source, seq."""
    return DEAD_LETTERS.recent(limit)


class FeedCursor:
    """What a worker has not yet sent of both feeds; `take()` returns that and moves on."""

    def __init__(self) -> None:
        self._events = 0
        self._dead_letters = 0

    def take(self) -> dict[str, list[dict[str, Any]]]:
        """{"events": [...], "dead_letters": [...]}, only the non-empty ones (oldest first)."""
        out: dict[str, list[dict[str, Any]]] = {}
        events = EVENTS.since(self._events)
        if events:
            self._events = events[-1]["seq"]
            out["events"] = events
        dead = DEAD_LETTERS.since(self._dead_letters)
        if dead:
            self._dead_letters = dead[-1]["seq"]
            out["dead_letters"] = dead
        return out


def ingest_from_worker(message: dict[str, Any], worker_id: str) -> None:
    """Supervisor side: add the events and dead letters a worker's heartbeat (or `bye`) carried."""
    EVENTS.ingest(message.get("events") or (), worker_id)
    DEAD_LETTERS.ingest(message.get("dead_letters") or (), worker_id)
