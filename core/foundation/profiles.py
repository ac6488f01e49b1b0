"""`PROFILE`: named presets for groups of settings (in-flight limit, batch sizes, logging, heartbeat
and timeouts). A preset only fills in what the environment leaves unset: explicit settings win.

The values are environment strings, parsed and checked by `core.foundation.config.load_settings` like any
other, so a preset can never hold a value a user could not set. README.md, "Profiles", lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol


class ProfiledSettings(Protocol):
    """What `describe_profile` reads of `core.foundation.config.Settings` (which imports this module)."""

    profile: str | None
    profile_explicit: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    purpose: str
    values: Mapping[str, str]  # environment variable -> value


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("production", "throughput with reliable delivery; JSON logs for a log collector", {
        "MAX_INFLIGHT": "200", "STREAM_BATCH_SIZE": "100", "OUTBOX_BATCH_SIZE": "100", "OUTBOX_TICK_INTERVAL": "1",
        "LOG_LEVEL": "INFO", "LOG_FORMAT": "json", "STATS_INTERVAL": "60",
        "WORKER_HEARTBEAT_TIMEOUT": "30", "WORKER_HANDLER_TIMEOUT": "300", "SHUTDOWN_TIMEOUT": "30",
        "HTTP_CHECK_TIMEOUT": "2",
    }),
    Profile("fast", "low latency: short queues, small batches, quick failure detection", {
        "MAX_INFLIGHT": "50", "STREAM_BATCH_SIZE": "10", "OUTBOX_BATCH_SIZE": "20", "OUTBOX_TICK_INTERVAL": "0.1",
        "LOG_LEVEL": "WARNING", "LOG_FORMAT": "json", "STATS_INTERVAL": "60", "MQTT_KEEPALIVE": "15",
        "WORKER_HEARTBEAT_TIMEOUT": "10", "WORKER_HANDLER_TIMEOUT": "30", "SHUTDOWN_TIMEOUT": "10",
        "HTTP_CHECK_TIMEOUT": "1",
    }),
    Profile("batch", "high volume: many messages in flight, large batches, long-running handlers", {
        "MAX_INFLIGHT": "1000", "STREAM_BATCH_SIZE": "500", "OUTBOX_BATCH_SIZE": "500", "OUTBOX_TICK_INTERVAL": "2",
        "LOG_LEVEL": "INFO", "LOG_FORMAT": "json", "STATS_INTERVAL": "60",
        "WORKER_HEARTBEAT_TIMEOUT": "60", "WORKER_HANDLER_TIMEOUT": "1800", "SHUTDOWN_TIMEOUT": "120",
        "HTTP_CHECK_TIMEOUT": "5",
    }),
    Profile("debug", "development: DEBUG text logs, one batch item at a time, no handler watchdog", {
        "MAX_INFLIGHT": "10", "STREAM_BATCH_SIZE": "1", "OUTBOX_BATCH_SIZE": "1", "OUTBOX_TICK_INTERVAL": "1",
        "LOG_LEVEL": "DEBUG", "LOG_FORMAT": "text", "STATS_INTERVAL": "10",
        "WORKER_HEARTBEAT_TIMEOUT": "300", "WORKER_HANDLER_TIMEOUT": "0", "SHUTDOWN_TIMEOUT": "5",
        "HTTP_CHECK_TIMEOUT": "5",
    }),
)}


def apply_profile(env: Mapping[str, str], name: str | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """`env` with the preset's values where it leaves them unset (missing or blank), and the names of the
    preset's settings it set explicitly."""
    if name is None:
        return dict(env), ()
    preset = PROFILES[name].values
    explicit = tuple(sorted(k for k in preset if env.get(k, "").strip()))
    merged = dict(env)
    for key, value in preset.items():
        if key not in explicit:
            merged[key] = value
    return merged, explicit


def describe_profile(settings: ProfiledSettings) -> str:
    """One line for `python main.py routes`: the profile and the values in effect for its settings."""
    if settings.profile is None:
        return "profile: none (PROFILE unset: the defaults)"
    profile = PROFILES[settings.profile]
    values = []
    for key in profile.values:
        value = getattr(settings, key.lower())
        values.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
        if key in settings.profile_explicit:
            values[-1] += " (explicit)"
    return f"profile: {profile.name} ({profile.purpose}): {', '.join(values)}"
