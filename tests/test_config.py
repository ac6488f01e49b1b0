"""Settings: each variable parsed from a plain mapping; bad values raise ConfigError naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.foundation.config import (
    ConfigError,
    Settings,
    default_client_id,
    load_settings,
    load_settings_from_environment,
    parse_bool,
    parse_size,
)


def test_defaults_from_an_empty_environment() -> None:
    s = load_settings({})
    assert s.mqtt_broker is None and s.uses_embedded_broker
    assert (s.broker_host, s.broker_port) == ("127.0.0.1", 1883)
    assert s.mqtt_protocol == "5"
    assert not s.mqtt_v5  # the embedded broker speaks 3.1.1 only
    assert s.mqtt_client_id == default_client_id("mqtt-app")
    assert s.mqtt_session_expiry == 300
    assert not s.mqtt_clean_start
    assert s.max_inflight == 100
    assert s.dead_letter_topic == "dead-letter/{topic}"
    assert s.shutdown_timeout == 30.0
    assert s.worker_handler_timeout == 300.0
    assert load_settings({"WORKER_HANDLER_TIMEOUT": "0"}).worker_handler_timeout == 0.0
    assert s.log_level == "INFO"


def test_client_id_is_stable_and_overridable() -> None:
    assert load_settings({}).mqtt_client_id == load_settings({}).mqtt_client_id
    assert load_settings({"APP_NAME": "shop"}).mqtt_client_id.startswith("shop-")
    assert load_settings({"MQTT_CLIENT_ID": " fixed-id "}).mqtt_client_id == "fixed-id"


ENV = {
    "APP_NAME": "demo",
    "MQTT_BROKER": "broker.local",
    "MQTT_PORT": "8883",
    "MQTT_USERNAME": "u",
    "MQTT_PASSWORD": "p",
    "MQTT_CLIENT_ID": "cid",
    "MQTT_GROUP_NAME": "grp",
    "MQTT_PROTOCOL": "311",
    "MQTT_KEEPALIVE": "30",
    "MQTT_SESSION_EXPIRY": "0",
    "MQTT_CLEAN_START": "yes",
    "MQTT_RECONNECT_MIN": "0.1",
    "MQTT_RECONNECT_MAX": "2",
    "EMBEDDED_BROKER_PORT": "1999",
    "MAX_INFLIGHT": "7",
    "MAX_PAYLOAD_BYTES": "2KB",
    "DEAD_LETTER_TOPIC": "dlq/{topic}",
    "DEAD_LETTER_QOS": "0",
    "SYNC_HANDLER_THREADS": "3",
    "SHUTDOWN_TIMEOUT": "1.5",
    "ROUTERS_PACKAGE": "tests.apps.x",
    "LOG_LEVEL": "debug",
    "LOG_FORMAT": "json",
}


def test_every_variable_is_read() -> None:
    s = load_settings(ENV)
    assert s == Settings(
        app_name="demo", mqtt_broker="broker.local", mqtt_port=8883, mqtt_username="u", mqtt_password="p",
        mqtt_client_id="cid", mqtt_group_name="grp", mqtt_protocol="3.1.1", mqtt_keepalive=30,
        mqtt_session_expiry=0, mqtt_clean_start=True, mqtt_reconnect_min=0.1, mqtt_reconnect_max=2.0,
        embedded_broker_port=1999, max_inflight=7, max_payload_bytes=2048, dead_letter_topic="dlq/{topic}",
        dead_letter_qos=0, sync_handler_threads=3, shutdown_timeout=1.5, routers_package="tests.apps.x",
        log_level="DEBUG", log_format="json",
    )
    assert (s.broker_host, s.broker_port) == ("broker.local", 8883)
    assert not s.mqtt_v5


def test_external_broker_uses_v5_by_default() -> None:
    s = load_settings({"MQTT_BROKER": "127.0.0.1"})
    assert s.mqtt_v5 and not s.uses_embedded_broker
    assert s.broker_port == 1883


def test_blank_values_mean_default() -> None:
    assert load_settings({"MAX_INFLIGHT": "  ", "MQTT_BROKER": ""}) == load_settings({})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MQTT_PORT", "abc"),
        ("MQTT_PORT", "0"),
        ("MQTT_PORT", "70000"),
        ("MQTT_PROTOCOL", "4"),
        ("MQTT_KEEPALIVE", "1"),
        ("MQTT_SESSION_EXPIRY", "-1"),
        ("MQTT_CLEAN_START", "maybe"),
        ("MQTT_TLS", "2"),
        ("MQTT_RECONNECT_MIN", "nan"),
        ("MQTT_RECONNECT_MIN", "0"),
        ("EMBEDDED_BROKER_PORT", "x"),
        ("MAX_INFLIGHT", "0"),
        ("MAX_INFLIGHT", "1.5"),
        ("MAX_INFLIGHT", "ten"),
        ("MAX_PAYLOAD_BYTES", "12XB"),
        ("MAX_PAYLOAD_BYTES", "KB"),
        ("MAX_PAYLOAD_BYTES", "0"),
        ("DEAD_LETTER_TOPIC", "dlq/+/x"),
        ("DEAD_LETTER_TOPIC", "dlq/#"),
        ("DEAD_LETTER_QOS", "3"),
        ("SYNC_HANDLER_THREADS", "0"),
        ("SHUTDOWN_TIMEOUT", "-1"),
        ("SHUTDOWN_TIMEOUT", "soon"),
        ("APP_NAME", "a/b"),
        ("MQTT_GROUP_NAME", "g+"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_FORMAT", "xml"),
        ("WORKER_COUNT", "0"),
        ("WORKER_HANDLER_TIMEOUT", "-1"),
        ("STATS_INTERVAL", "x"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert name in str(info.value)


def test_cross_checks() -> None:
    with pytest.raises(ConfigError, match="MQTT_RECONNECT_MAX"):
        load_settings({"MQTT_RECONNECT_MIN": "5", "MQTT_RECONNECT_MAX": "1"})
    with pytest.raises(ConfigError, match="MQTT_PASSWORD"):
        load_settings({"MQTT_PASSWORD": "secret"})
    with pytest.raises(ConfigError, match="MQTT_TLS_CERT"):
        load_settings({"MQTT_TLS": "true", "MQTT_TLS_CERT": __file__})
    with pytest.raises(ConfigError, match="MQTT_TLS_CA"):
        load_settings({"MQTT_TLS": "true", "MQTT_TLS_CA": "/nonexistent/ca.pem"})
    s = load_settings({"MQTT_TLS": "on", "MQTT_TLS_CA": __file__})
    assert s.mqtt_tls and s.mqtt_tls_ca == __file__


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("TRUE", True), (" on ", True), ("no", False), ("0", False)])
def test_parse_bool(raw: str, expected: bool) -> None:
    assert parse_bool("X", raw) is expected


@pytest.mark.parametrize(("raw", "expected"), [("10", 10), ("256KB", 262144), ("1mb", 1048576), ("1.5k", 1536), ("2 KB", 2048)])
def test_parse_size(raw: str, expected: int) -> None:
    assert parse_size("X", raw) == expected


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_INFLIGHT=9\nMQTT_KEEPALIVE=33\n")
    monkeypatch.delenv("MAX_INFLIGHT", raising=False)
    monkeypatch.setenv("MQTT_KEEPALIVE", "44")
    try:
        s = load_settings_from_environment(env_file)
        assert s.max_inflight == 9
        assert s.mqtt_keepalive == 44
    finally:
        monkeypatch.delenv("MAX_INFLIGHT", raising=False)  # load_dotenv wrote it into os.environ


@pytest.mark.parametrize("name", ["MQTT_CLIENT_ID", "MQTT_GROUP_NAME", "MQTT_USERNAME", "DEAD_LETTER_TOPIC", "APP_NAME"])
def test_strings_sent_to_the_broker_must_be_valid_mqtt_strings(name: str) -> None:
    """A control character would make the broker refuse the CONNECT (or drop the connection) every time."""
    with pytest.raises(ConfigError, match=rf"{name}=.*control character U\+0009"):
        load_settings({name: "bad\tvalue"})
