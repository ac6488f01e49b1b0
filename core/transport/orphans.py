"""Orphan notices: the MQTT 5 will every client of the app registers, so that a session its owner
left for good is adopted by another replica (docs/workers.md, "Replicas that go away").

A client connects with a will on `_orphans/<MQTT_GROUP_NAME>/<client id>`: retained, QoS 1,
delayed by MQTT_ORPHAN_GRACE seconds. A normal stop disconnects with reason code 0x04 (keep the
will), a crash drops the connection; either way the broker publishes the notice once the grace has
passed, unless a connection to the same session came back first. A session ended on purpose
(expiry 0) disconnects with 0x00, which discards the will. Each client clears its own retained
notice when it connects. `core.processes.adoption.OrphanWatch` receives the notices and adopts the sessions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from core.foundation.config import Settings

ORPHAN_PREFIX = "_orphans"
DISCONNECT_WITH_WILL = 0x04  # MQTT 5 reason code: disconnect normally but publish the will
_UNSAFE = re.compile(r"[/+#\x00]")


@dataclass(frozen=True)
class Notice:
    """What a will announces: the client id whose session waits to be adopted."""

    client_id: str
    group: str


def notices_enabled(settings: Settings, session_expiry: int | None = None) -> bool:
    """True if clients register orphan notices: MQTT 5, a grace, and sessions that outlive it."""
    expiry = settings.mqtt_session_expiry if session_expiry is None else session_expiry
    return settings.mqtt_v5 and settings.mqtt_orphan_grace > 0 and expiry > settings.mqtt_orphan_grace


def notice_topic(group: str, client_id: str) -> str:
    """`_orphans/<group>/<client id>`, with `/`, `+`, `#` in the id replaced (the payload has the exact id)."""
    return f"{ORPHAN_PREFIX}/{group}/{_UNSAFE.sub('_', client_id) or '_'}"


def notice_filter(group: str) -> str:
    return f"{ORPHAN_PREFIX}/{group}/+"


def notice_payload(group: str, client_id: str) -> bytes:
    return json.dumps({"client_id": client_id, "group": group}).encode()


def parse_notice(payload: bytes, group: str) -> Notice | None:
    """The notice in a will's payload; None for an empty (cleared) or foreign one."""
    if not payload:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    client_id, their_group = data.get("client_id"), data.get("group")
    if not isinstance(client_id, str) or not client_id or their_group != group:
        return None
    return Notice(client_id, group)


# Totals of this process's adoptions (core/processes/adoption.py counts, /metrics exports them).
ADOPTION_TOTALS: dict[str, int] = {"ended": 0, "none": 0, "unreachable": 0, "failed": 0, "messages": 0}


def add_metric_families(out: list[Any], prefix: str) -> None:
    """Prometheus families of this process's adoptions (none before the first one)."""
    if not any(ADOPTION_TOTALS.values()):
        return
    from prometheus_client.core import CounterMetricFamily

    outcomes = CounterMetricFamily(f"{prefix}_sessions_adopted", "Orphaned sessions this pod adopted, by outcome "
                                   "(ended: drained and ended; none: no session left; unreachable; failed)",
                                   labels=["outcome"])
    for outcome in ("ended", "none", "unreachable", "failed"):
        outcomes.add_metric([outcome], ADOPTION_TOTALS[outcome])
    messages = CounterMetricFamily(f"{prefix}_adopted_messages", "Parked messages handled while adopting sessions")
    messages.add_metric([], ADOPTION_TOTALS["messages"])
    out.extend([outcomes, messages])
