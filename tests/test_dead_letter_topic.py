"""Which topics count as dead-letter topics (a failure there is not dead-lettered again)."""

from __future__ import annotations

import pytest

from core.runtime.dispatcher import dead_letter_matcher


@pytest.mark.parametrize(
    ("template", "topic", "expected"),
    [
        ("dead-letter/{topic}", "dead-letter/devices/1/status", True),
        ("dead-letter/{topic}", "devices/1/status", False),
        ("dead-letter/{topic}", "dead-letter/", False),
        # No placeholder: only that one topic, not everything that starts like it.
        ("dlq", "dlq", True),
        ("dlq", "dlqueue/x", False),
        ("dlq", "dlq/x", False),
        # Placeholder first: matched on the suffix, not "every topic".
        ("{topic}/failed", "sensors/7/data/failed", True),
        ("{topic}/failed", "sensors/7/data", False),
        ("errors/{topic}/dead", "errors/a/b/dead", True),
        ("errors/{topic}/dead", "errors/a/b", False),
    ],
)
def test_dead_letter_matcher(template: str, topic: str, expected: bool) -> None:
    assert dead_letter_matcher(template)(topic) is expected
