"""What one adoption leaves behind for the operator: the events feed, /metrics totals, the live view."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from core.processes import adoption
from core.runtime import events
from core.transport import orphans
from core.processes.adoption import OrphanWatch
from core.foundation.config import load_settings
from core.runtime.events import recent_events


class FakeParked:
    """Stands in for ParkedSessions: `adopt` returns a given outcome or raises."""

    def __init__(self, app: Any, first: int = 0) -> None:
        self.outcomes: list[Any] = []

    async def adopt(self, client_id: str) -> dict[str, Any]:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def stop(self) -> None:
        pass


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(adoption, "ParkedSessions", FakeParked)
    events.EVENTS.clear()
    saved = dict(orphans.ADOPTION_TOTALS)
    for key in orphans.ADOPTION_TOTALS:
        orphans.ADOPTION_TOTALS[key] = 0
    yield
    orphans.ADOPTION_TOTALS.update(saved)
    events.EVENTS.clear()


async def _adopt_all(outcomes: list[Any]) -> OrphanWatch:
    app = SimpleNamespace(settings=load_settings({"MQTT_CLIENT_ID": "pod-a"}))

    async def ready() -> None:
        return None

    watch = OrphanWatch(app, lambda: {"pod-a"}, ready)  # type: ignore[arg-type]
    watch._parked.outcomes = list(outcomes)  # type: ignore[attr-defined]
    watch._stopped = asyncio.Event()
    for n in range(len(outcomes)):
        await watch._adopt(f"pod-b-w{n}", "orphan notice")
    return watch


def _families() -> dict[str, Any]:
    out: list[Any] = []
    orphans.add_metric_families(out, "mqtt_app")
    return {family.name: {tuple(s.labels.values()): s.value for s in family.samples} for family in out}


async def test_adoptions_show_in_the_events_feed_and_the_metrics() -> None:
    watch = await _adopt_all([
        {"state": "ended", "handled": 312}, {"state": "none"}, {"state": "unreachable"}, RuntimeError("boom"),
    ])
    texts = [event["text"] for event in recent_events() if event["kind"] == "adoption"]
    assert len(texts) == 4
    assert any("pod-b-w0" in text and "312 parked message(s)" in text and "ended it" in text for text in texts)
    assert any("pod-b-w1" in text and "no session left" in text for text in texts)
    assert any("pod-b-w2" in text and "later sweep" in text for text in texts)
    assert any("pod-b-w3" in text and "failed" in text for text in texts)
    assert set(watch.adopted) == {"pod-b-w0", "pod-b-w1", "pod-b-w2"}
    families = _families()
    assert families["mqtt_app_sessions_adopted"] == {
        ("ended",): 1, ("none",): 1, ("unreachable",): 1, ("failed",): 1,
    }
    assert families["mqtt_app_adopted_messages"] == {(): 312}


def test_no_adoption_metrics_before_the_first_adoption() -> None:
    assert _families() == {}
