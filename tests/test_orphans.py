"""Orphan notices (core/transport/orphans.py): topics, payloads, when clients register them, and the settings."""

from __future__ import annotations

import pytest

from core.processes.adoption import sweep_interval
from core.foundation.config import ConfigError, load_settings
from core.transport.orphans import Notice, notice_filter, notice_payload, notice_topic, notices_enabled, parse_notice


def settings(**env: str):  # type: ignore[no-untyped-def]
    return load_settings({"MQTT_BROKER": "127.0.0.1", **env})


def test_the_topic_names_group_and_client_id_with_wildcards_and_slashes_replaced() -> None:
    assert notice_topic("workers", "app-7f9c-w1") == "_orphans/workers/app-7f9c-w1"
    assert notice_topic("workers", "a/b+c#d") == "_orphans/workers/a_b_c_d"
    assert notice_filter("workers") == "_orphans/workers/+"


def test_the_payload_round_trips_and_foreign_or_cleared_payloads_are_ignored() -> None:
    payload = notice_payload("workers", "a/b-w0")
    assert parse_notice(payload, "workers") == Notice("a/b-w0", "workers")
    assert parse_notice(payload, "other-group") is None
    assert parse_notice(b"", "workers") is None  # a cleared (empty retained) notice
    assert parse_notice(b"not json", "workers") is None
    assert parse_notice(b'["x"]', "workers") is None
    assert parse_notice(b'{"client_id": "", "group": "workers"}', "workers") is None


def test_notices_need_mqtt5_a_grace_and_sessions_that_outlive_it() -> None:
    assert notices_enabled(settings())  # defaults: grace 15, expiry 300
    assert not notices_enabled(settings(MQTT_PROTOCOL="3.1.1"))
    assert not notices_enabled(settings(MQTT_ORPHAN_GRACE="0"))
    assert not notices_enabled(load_settings({}))  # the embedded broker speaks 3.1.1
    # A client whose own session ends at once (a probe ending a session) registers none.
    assert not notices_enabled(settings(), session_expiry=0)


def test_a_session_expiry_not_above_the_grace_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"MQTT_SESSION_EXPIRY=10 must exceed MQTT_ORPHAN_GRACE=15"):
        settings(MQTT_SESSION_EXPIRY="10")
    with pytest.raises(ConfigError, match=r"MQTT_SESSION_EXPIRY=5 must exceed MQTT_ORPHAN_GRACE=5"):
        settings(MQTT_SESSION_EXPIRY="5", MQTT_ORPHAN_GRACE="5")
    assert settings(MQTT_SESSION_EXPIRY="0").mqtt_session_expiry == 0  # no persistent sessions: nothing to adopt
    assert settings(MQTT_SESSION_EXPIRY="10", MQTT_ORPHAN_GRACE="0").mqtt_orphan_grace == 0
    with pytest.raises(ConfigError, match="MQTT_ORPHAN_GRACE"):
        settings(MQTT_ORPHAN_GRACE="-1")


def test_the_defaults_bound_the_wait_well_below_the_session_expiry() -> None:
    s = settings()
    # Live path: the grace; sweep path: two sweep intervals more (each at most 1.2 x the interval).
    worst = s.mqtt_orphan_grace + 2 * 1.2 * sweep_interval(s.mqtt_orphan_grace)
    assert worst < 60 < s.mqtt_session_expiry
