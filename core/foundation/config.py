"""Settings read from the environment (and `.env`), validated, with errors naming the variable.

`load_settings(env)` is a pure function of a mapping, so tests pass a dict instead of patching
`os.environ`. `Settings` is frozen: every process (the supervisor and each worker) builds its own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from core.foundation.profiles import PROFILES, apply_profile
from core.foundation.mqtt_text import string_problem

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def parse_int(name: str, raw: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    _check_range(name, raw, value, minimum, maximum)
    return value


def parse_float(name: str, raw: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value != value:  # NaN
        raise ConfigError(f"{name}={raw!r} is not a number")
    _check_range(name, raw, value, minimum, maximum)
    return value


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}


def parse_size(name: str, raw: str, *, minimum: int = 0) -> int:
    """Bytes, with an optional unit: `262144`, `256KB`, `1MB`."""
    text = raw.strip().lower()
    digits = text.rstrip("kmgb ")
    unit = text[len(digits):].strip()
    if unit not in _SIZE_UNITS or not digits:
        raise ConfigError(f"{name}={raw!r} is not a size (examples: 262144, 256KB, 1MB)")
    try:
        value = int(float(digits) * _SIZE_UNITS[unit])
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a size (examples: 262144, 256KB, 1MB)") from None
    _check_range(name, raw, value, minimum, None)
    return value


def _check_range(name: str, raw: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={raw!r} must be at most {maximum}")


def parse_tracing(name: str, raw: str) -> str:
    value = parse_choice(name, raw, ("off", "w3c", "otel"))
    if value == "otel":
        import importlib.util

        if importlib.util.find_spec("opentelemetry") is None:
            raise ConfigError(f"{name}=otel needs the opentelemetry-api package (pip install opentelemetry-api, and "
                              "an SDK with an exporter to send the spans somewhere); or use TRACING=w3c")
    return value


def parse_choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r} must be one of: {', '.join(choices)}")
    return value


def default_client_id(app_name: str) -> str:
    """Stable across restarts of the same host, so the broker keeps the persistent session."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{app_name}-{host}"


# The default database: a SQLite file in the project directory (nothing to install).
DEFAULT_DATABASE_URL = f"sqlite+aiosqlite:///{Path(__file__).resolve().parent.parent / 'app.db'}"


MAX_HISTORY_POINTS = 2000  # per chart series (STATUS_HISTORY_WINDOW / STATUS_HISTORY_INTERVAL)


@dataclass(frozen=True)
class Settings:
    """Every setting of the framework. Documented in README.md and `.env.example`."""

    app_name: str = "mqtt-app"
    # Broker connection. mqtt_broker None means: start the embedded broker.
    mqtt_broker: str | None = None
    mqtt_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_client_id: str = ""
    mqtt_group_name: str = "workers"
    mqtt_protocol: str = "5"  # "5" or "3.1.1"
    mqtt_keepalive: int = 60
    mqtt_session_expiry: int = 300
    mqtt_clean_start: bool = False
    mqtt_tls: bool = False
    mqtt_tls_ca: str | None = None
    mqtt_tls_cert: str | None = None
    mqtt_tls_key: str | None = None
    mqtt_tls_insecure: bool = False
    mqtt_reconnect_min: float = 0.5
    mqtt_reconnect_max: float = 30.0
    # Orphan notices (core/transport/orphans.py, docs/workers.md): seconds a departed client id may stay away
    # before the fleet adopts its session; 0 turns the mechanism off. MQTT 5 only.
    mqtt_orphan_grace: float = 15.0
    embedded_broker_host: str = "127.0.0.1"
    embedded_broker_port: int = 1883
    # Dispatch.
    max_inflight: int = 100
    max_payload_bytes: int = 256 * 1024
    dead_letter_topic: str = "dead-letter/{topic}"
    dead_letter_qos: int = 1
    error_log_interval: float = 60.0  # the same error on the same route logs its traceback once per interval
    sync_handler_threads: int = 16
    shutdown_timeout: float = 30.0
    routers_package: str = "app.routers"
    # Workers (used by core.processes.supervisor and core.processes.worker).
    worker_count: int | None = None
    worker_heartbeat_timeout: float = 30.0
    worker_handler_timeout: float = 300.0  # a worker whose oldest handler runs longer is replaced; 0 = off
    worker_max_restarts: int = 5
    worker_restart_window: float = 60.0
    worker_max_messages: int = 0
    worker_max_memory_mb: int = 0
    # Worker autoscaling (core/processes/autoscale.py, docs/workers.md). worker_max_count None: one per CPU core.
    worker_auto_scale: bool = False
    worker_min_count: int = 1
    worker_max_count: int | None = None
    worker_scale_up_at: float = 0.8
    worker_scale_down_at: float = 0.3
    worker_scale_up_window: float = 10.0
    worker_scale_down_window: float = 60.0
    worker_scale_cooldown: float = 30.0
    stats_interval: float = 30.0
    test_mode_idle: float = 5.0
    # The preset in effect (PROFILE, core/foundation/profiles.py) and which of its settings were set explicitly.
    profile: str | None = None
    profile_explicit: tuple[str, ...] = ()
    # Logging.
    log_level: str = "INFO"
    log_format: str = "text"
    # Trace context (core/foundation/tracing.py, docs/tracing.md): off, w3c (propagate traceparent) or otel (also spans).
    tracing: str = "w3c"
    # Operations (core/operations/http.py): /health, /ready, /metrics and the status page. Off when HTTP_PORT is unset.
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    http_check_timeout: float = 2.0
    status_history_interval: float = 5.0  # seconds between two points of the status page's charts
    status_history_window: float = 900.0  # seconds of history the charts show (kept in memory)
    # --- Redis Streams (core/integrations/streams.py, docs/streams.md) ---
    enable_redis: bool = False
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_maxlen: int = 1_000_000  # approximate MAXLEN of each stream; 0 = never trimmed
    stream_claim_idle_ms: int = 60_000
    stream_max_retries: int = 3
    stream_retry_delay: float = 1.0
    stream_batch_size: int = 100
    # --- Database and transactional outbox (core/integrations/database.py, core/integrations/outbox.py, docs/outbox.md) ---
    enable_database: bool = False
    database_url: str = DEFAULT_DATABASE_URL
    database_create_tables: bool = True
    outbox_enabled: bool = True  # run an outbox processor in this process (when the database is enabled)
    outbox_table: str = "outbox"
    outbox_batch_size: int = 100
    outbox_tick_interval: float = 1.0
    outbox_max_attempts: int = 10
    outbox_base_delay: float = 1.0
    outbox_lock_timeout: float = 60.0
    outbox_retention: float = 7 * 86400.0

    @property
    def uses_embedded_broker(self) -> bool:
        return self.mqtt_broker is None

    @property
    def broker_host(self) -> str:
        return self.mqtt_broker if self.mqtt_broker is not None else self.embedded_broker_host

    @property
    def broker_port(self) -> int:
        return self.mqtt_port if self.mqtt_broker is not None else self.embedded_broker_port

    @property
    def mqtt_v5(self) -> bool:
        # amqtt (the embedded broker) speaks 3.1.1 only.
        return self.mqtt_protocol == "5" and not self.uses_embedded_broker

    def with_overrides(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


def _opt(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    return raw


def _get(env: Mapping[str, str], name: str, default: T, parse: Callable[[str, str], T]) -> T:
    raw = _opt(env, name)
    return default if raw is None else parse(name, raw)


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build validated settings from a mapping of environment variables."""
    d = Settings()
    profile = _get(env, "PROFILE", None, lambda n, r: parse_choice(n, r, tuple(PROFILES)))
    env, profile_explicit = apply_profile(env, profile)
    pos_int = lambda n, r: parse_int(n, r, minimum=1)  # noqa: E731
    nonneg_int = lambda n, r: parse_int(n, r, minimum=0)  # noqa: E731
    nonneg_float = lambda n, r: parse_float(n, r, minimum=0)  # noqa: E731
    pos_float = lambda n, r: parse_float(n, r, minimum=0.001)  # noqa: E731
    text = lambda n, r: r.strip()  # noqa: E731

    app_name = _get(env, "APP_NAME", d.app_name, text)
    if not app_name or any(c in app_name for c in "/+#"):
        raise ConfigError(f"APP_NAME={app_name!r} must be non-empty and free of '/', '+', '#'")
    protocol = _get(env, "MQTT_PROTOCOL", d.mqtt_protocol, lambda n, r: parse_choice(n, r, ("5", "3.1.1", "311")))
    if protocol == "311":
        protocol = "3.1.1"
    group = _get(env, "MQTT_GROUP_NAME", d.mqtt_group_name, text)
    if not group or any(c in group for c in "/+#"):
        raise ConfigError(f"MQTT_GROUP_NAME={group!r} must be non-empty and free of '/', '+', '#'")
    dead_letter = _get(env, "DEAD_LETTER_TOPIC", d.dead_letter_topic, text)
    if "+" in dead_letter or "#" in dead_letter or not dead_letter:
        raise ConfigError(f"DEAD_LETTER_TOPIC={dead_letter!r} must be a topic name without wildcards")
    log_level = _get(env, "LOG_LEVEL", d.log_level, lambda n, r: parse_choice(n, r, ("debug", "info", "warning", "error", "critical"))).upper()

    settings = Settings(
        app_name=app_name,
        mqtt_broker=_opt(env, "MQTT_BROKER"),
        mqtt_port=_get(env, "MQTT_PORT", d.mqtt_port, lambda n, r: parse_int(n, r, minimum=1, maximum=65535)),
        mqtt_username=_opt(env, "MQTT_USERNAME"),
        mqtt_password=_opt(env, "MQTT_PASSWORD"),
        mqtt_client_id=_get(env, "MQTT_CLIENT_ID", "", text) or default_client_id(app_name),
        mqtt_group_name=group,
        mqtt_protocol=protocol,
        mqtt_keepalive=_get(env, "MQTT_KEEPALIVE", d.mqtt_keepalive, lambda n, r: parse_int(n, r, minimum=5, maximum=65535)),
        mqtt_session_expiry=_get(env, "MQTT_SESSION_EXPIRY", d.mqtt_session_expiry, nonneg_int),
        mqtt_clean_start=_get(env, "MQTT_CLEAN_START", d.mqtt_clean_start, parse_bool),
        mqtt_tls=_get(env, "MQTT_TLS", d.mqtt_tls, parse_bool),
        mqtt_tls_ca=_opt(env, "MQTT_TLS_CA"),
        mqtt_tls_cert=_opt(env, "MQTT_TLS_CERT"),
        mqtt_tls_key=_opt(env, "MQTT_TLS_KEY"),
        mqtt_tls_insecure=_get(env, "MQTT_TLS_INSECURE", d.mqtt_tls_insecure, parse_bool),
        mqtt_reconnect_min=_get(env, "MQTT_RECONNECT_MIN", d.mqtt_reconnect_min, pos_float),
        mqtt_reconnect_max=_get(env, "MQTT_RECONNECT_MAX", d.mqtt_reconnect_max, pos_float),
        mqtt_orphan_grace=_get(env, "MQTT_ORPHAN_GRACE", d.mqtt_orphan_grace,
                               lambda n, r: parse_float(n, r, minimum=0, maximum=86400)),
        embedded_broker_host=_get(env, "EMBEDDED_BROKER_HOST", d.embedded_broker_host, text),
        embedded_broker_port=_get(env, "EMBEDDED_BROKER_PORT", d.embedded_broker_port, lambda n, r: parse_int(n, r, minimum=1, maximum=65535)),
        max_inflight=_get(env, "MAX_INFLIGHT", d.max_inflight, lambda n, r: parse_int(n, r, minimum=1, maximum=65535)),
        max_payload_bytes=_get(env, "MAX_PAYLOAD_BYTES", d.max_payload_bytes, lambda n, r: parse_size(n, r, minimum=1)),
        dead_letter_topic=dead_letter,
        dead_letter_qos=_get(env, "DEAD_LETTER_QOS", d.dead_letter_qos, lambda n, r: parse_int(n, r, minimum=0, maximum=2)),
        error_log_interval=_get(env, "ERROR_LOG_INTERVAL", d.error_log_interval, pos_float),
        sync_handler_threads=_get(env, "SYNC_HANDLER_THREADS", d.sync_handler_threads, pos_int),
        shutdown_timeout=_get(env, "SHUTDOWN_TIMEOUT", d.shutdown_timeout, nonneg_float),
        routers_package=_get(env, "ROUTERS_PACKAGE", d.routers_package, text),
        worker_count=_get(env, "WORKER_COUNT", d.worker_count, pos_int),
        worker_heartbeat_timeout=_get(env, "WORKER_HEARTBEAT_TIMEOUT", d.worker_heartbeat_timeout, pos_float),
        worker_handler_timeout=_get(env, "WORKER_HANDLER_TIMEOUT", d.worker_handler_timeout, nonneg_float),
        worker_max_restarts=_get(env, "WORKER_MAX_RESTARTS", d.worker_max_restarts, nonneg_int),
        worker_restart_window=_get(env, "WORKER_RESTART_WINDOW", d.worker_restart_window, pos_float),
        worker_max_messages=_get(env, "WORKER_MAX_MESSAGES", d.worker_max_messages, nonneg_int),
        worker_max_memory_mb=_get(env, "WORKER_MAX_MEMORY_MB", d.worker_max_memory_mb, nonneg_int),
        **_autoscaling(env, d),
        stats_interval=_get(env, "STATS_INTERVAL", d.stats_interval, pos_float),
        test_mode_idle=_get(env, "TEST_MODE_IDLE", d.test_mode_idle, pos_float),
        profile=profile,
        profile_explicit=profile_explicit,
        log_level=log_level,
        log_format=_get(env, "LOG_FORMAT", d.log_format, lambda n, r: parse_choice(n, r, ("text", "json"))),
        tracing=_get(env, "TRACING", d.tracing, parse_tracing),
        http_port=_get(env, "HTTP_PORT", d.http_port, lambda n, r: parse_int(n, r, minimum=0, maximum=65535)),
        http_host=_get(env, "HTTP_HOST", d.http_host, text),
        http_check_timeout=_get(env, "HTTP_CHECK_TIMEOUT", d.http_check_timeout, pos_float),
        status_history_interval=_get(env, "STATUS_HISTORY_INTERVAL", d.status_history_interval,
                                     lambda n, r: parse_duration(n, r, minimum=0.5)),
        status_history_window=_get(env, "STATUS_HISTORY_WINDOW", d.status_history_window,
                                   lambda n, r: parse_duration(n, r, minimum=60)),
        **_streams_and_outbox(env, d),
    )
    for name in ("APP_NAME", "MQTT_CLIENT_ID", "MQTT_GROUP_NAME", "MQTT_USERNAME", "DEAD_LETTER_TOPIC"):
        value = getattr(settings, name.lower())
        problem = None if value is None else string_problem(value)  # the broker would refuse every CONNECT/PUBLISH
        if problem is not None:
            raise ConfigError(f"{name}={value!r} {problem}")
    if settings.mqtt_reconnect_max < settings.mqtt_reconnect_min:
        raise ConfigError(
            f"MQTT_RECONNECT_MAX={settings.mqtt_reconnect_max} must not be below MQTT_RECONNECT_MIN={settings.mqtt_reconnect_min}"
        )
    grace, expiry = settings.mqtt_orphan_grace, settings.mqtt_session_expiry
    if grace and expiry and expiry <= grace:
        raise ConfigError(
            f"MQTT_SESSION_EXPIRY={expiry} must exceed MQTT_ORPHAN_GRACE={grace:g}: a departed client's session must "
            "outlive the grace, or what is parked in it expires before the fleet adopts it (or set MQTT_ORPHAN_GRACE=0)"
        )
    if settings.mqtt_tls and (settings.mqtt_tls_cert is None) != (settings.mqtt_tls_key is None):
        raise ConfigError("MQTT_TLS_CERT and MQTT_TLS_KEY must be set together (client certificate and its key)")
    for name in ("MQTT_TLS_CA", "MQTT_TLS_CERT", "MQTT_TLS_KEY"):
        path = getattr(settings, name.lower())
        if settings.mqtt_tls and path is not None and not Path(path).is_file():
            raise ConfigError(f"{name}={path!r}: no such file")
    if settings.status_history_window < 2 * settings.status_history_interval:
        raise ConfigError(f"STATUS_HISTORY_WINDOW={settings.status_history_window:g} s must hold at least two "
                          f"STATUS_HISTORY_INTERVAL={settings.status_history_interval:g} s")
    if settings.status_history_window / settings.status_history_interval > MAX_HISTORY_POINTS:
        raise ConfigError(
            f"STATUS_HISTORY_WINDOW={settings.status_history_window:g} s / STATUS_HISTORY_INTERVAL="
            f"{settings.status_history_interval:g} s is more than {MAX_HISTORY_POINTS} chart points per series; "
            "take a longer interval or a shorter window"
        )
    if (settings.mqtt_username is None) and settings.mqtt_password is not None:
        raise ConfigError("MQTT_PASSWORD is set but MQTT_USERNAME is not")
    return settings


def _autoscaling(env: Mapping[str, str], d: Settings) -> dict[str, Any]:
    """WORKER_AUTO_SCALE and its bounds, thresholds and timings, checked against each other."""
    fraction = lambda n, r: parse_float(n, r, minimum=0.0, maximum=1.0)  # noqa: E731
    seconds = lambda n, r: parse_float(n, r, minimum=0.0)  # noqa: E731
    out = {
        "worker_auto_scale": _get(env, "WORKER_AUTO_SCALE", d.worker_auto_scale, parse_bool),
        "worker_min_count": _get(env, "WORKER_MIN_COUNT", d.worker_min_count, lambda n, r: parse_int(n, r, minimum=1)),
        "worker_max_count": _get(env, "WORKER_MAX_COUNT", d.worker_max_count, lambda n, r: parse_int(n, r, minimum=1)),
        "worker_scale_up_at": _get(env, "WORKER_SCALE_UP_AT", d.worker_scale_up_at, fraction),
        "worker_scale_down_at": _get(env, "WORKER_SCALE_DOWN_AT", d.worker_scale_down_at, fraction),
        "worker_scale_up_window": _get(env, "WORKER_SCALE_UP_WINDOW", d.worker_scale_up_window, seconds),
        "worker_scale_down_window": _get(env, "WORKER_SCALE_DOWN_WINDOW", d.worker_scale_down_window, seconds),
        "worker_scale_cooldown": _get(env, "WORKER_SCALE_COOLDOWN", d.worker_scale_cooldown, seconds),
    }
    if out["worker_max_count"] is not None and out["worker_max_count"] < out["worker_min_count"]:
        raise ConfigError(f"WORKER_MAX_COUNT={out['worker_max_count']} must not be below "
                          f"WORKER_MIN_COUNT={out['worker_min_count']}")
    if not 0 < out["worker_scale_up_at"] <= 1:
        raise ConfigError(f"WORKER_SCALE_UP_AT={out['worker_scale_up_at']} must be above 0 and at most 1")
    if out["worker_scale_down_at"] >= out["worker_scale_up_at"]:
        raise ConfigError(f"WORKER_SCALE_DOWN_AT={out['worker_scale_down_at']} must be below "
                          f"WORKER_SCALE_UP_AT={out['worker_scale_up_at']} (the gap between them is the hysteresis)")
    return out


# --- Redis Streams, database and outbox (issue 4) ----------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(name: str, raw: str, *, minimum: float = 0.0) -> float:
    """Seconds, with an optional unit: `30`, `1.5s`, `500ms`, `5m`, `2h`, `7d`."""
    text = raw.strip().lower()
    unit = next((u for u in ("ms", "s", "m", "h", "d") if text.endswith(u)), "")
    try:
        value = float(text[: len(text) - len(unit)].strip()) * _DURATION_UNITS.get(unit, 1.0)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a duration (examples: 30, 1.5s, 500ms, 5m, 2h, 7d)") from None
    if value != value:
        raise ConfigError(f"{name}={raw!r} is not a duration")
    _check_range(name, raw, value, minimum, None)
    return value


# Plain URLs name the async driver the framework uses for each database.
_DATABASE_DRIVERS = {
    "sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql", "mariadb": "mariadb+aiomysql",
}
_ASYNC_DATABASE_SCHEMES = {"sqlite+aiosqlite", "postgresql+asyncpg", "mysql+aiomysql", "mariadb+aiomysql"}


def parse_database_url(name: str, raw: str) -> str:
    url = raw.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"{name}={raw!r} is not a database URL (example: postgresql+asyncpg://user@host/db)")
    scheme = _DATABASE_DRIVERS.get(scheme.lower(), scheme.lower())
    if scheme not in _ASYNC_DATABASE_SCHEMES:
        raise ConfigError(
            f"{name}={raw!r}: unsupported driver {scheme!r}; use one of {', '.join(sorted(_ASYNC_DATABASE_SCHEMES))}"
        )
    return f"{scheme}://{rest}"


def parse_redis_url(name: str, raw: str) -> str:
    url = raw.strip()
    if not url.lower().startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{name}={raw!r} must start with redis://, rediss:// or unix://")
    return url


def _streams_and_outbox(env: Mapping[str, str], d: Settings) -> dict[str, Any]:
    pos_int = lambda n, r: parse_int(n, r, minimum=1)  # noqa: E731
    nonneg_int = lambda n, r: parse_int(n, r, minimum=0)  # noqa: E731
    duration = lambda n, r: parse_duration(n, r, minimum=0.0)  # noqa: E731
    positive_duration = lambda n, r: parse_duration(n, r, minimum=0.001)  # noqa: E731
    table = _get(env, "OUTBOX_TABLE", d.outbox_table, lambda n, r: r.strip())
    if not table.replace("_", "").isalnum() or table[0].isdigit():
        raise ConfigError(f"OUTBOX_TABLE={table!r} must be a plain table name (letters, digits, '_')")
    database_url = _opt(env, "DATABASE_URL")
    return {
        "enable_redis": _get(env, "ENABLE_REDIS", d.enable_redis, parse_bool),
        "redis_url": _get(env, "REDIS_URL", d.redis_url, parse_redis_url),
        "stream_maxlen": _get(env, "STREAM_MAXLEN", d.stream_maxlen, nonneg_int),
        "stream_claim_idle_ms": _get(env, "STREAM_CLAIM_IDLE_MS", d.stream_claim_idle_ms, pos_int),
        "stream_max_retries": _get(env, "STREAM_MAX_RETRIES", d.stream_max_retries, nonneg_int),
        "stream_retry_delay": _get(env, "STREAM_RETRY_DELAY", d.stream_retry_delay, duration),
        "stream_batch_size": _get(env, "STREAM_BATCH_SIZE", d.stream_batch_size, pos_int),
        # Setting DATABASE_URL turns the database on unless ENABLE_DATABASE says otherwise.
        "enable_database": _get(env, "ENABLE_DATABASE", database_url is not None, parse_bool),
        "database_url": d.database_url if database_url is None else parse_database_url("DATABASE_URL", database_url),
        "database_create_tables": _get(env, "DATABASE_CREATE_TABLES", d.database_create_tables, parse_bool),
        "outbox_enabled": _get(env, "OUTBOX_ENABLED", d.outbox_enabled, parse_bool),
        "outbox_table": table,
        "outbox_batch_size": _get(env, "OUTBOX_BATCH_SIZE", d.outbox_batch_size, pos_int),
        "outbox_tick_interval": _get(env, "OUTBOX_TICK_INTERVAL", d.outbox_tick_interval, positive_duration),
        "outbox_max_attempts": _get(env, "OUTBOX_MAX_ATTEMPTS", d.outbox_max_attempts, pos_int),
        "outbox_base_delay": _get(env, "OUTBOX_BASE_DELAY", d.outbox_base_delay, duration),
        "outbox_lock_timeout": _get(env, "OUTBOX_LOCK_TIMEOUT", d.outbox_lock_timeout, lambda n, r: parse_duration(n, r, minimum=1.0)),
        "outbox_retention": _get(env, "OUTBOX_RETENTION", d.outbox_retention, positive_duration),
    }


def load_settings_from_environment(dotenv_path: str | os.PathLike[str] | None = ".env") -> Settings:
    """Read `.env` (if present; real environment variables win) and then the environment."""
    if dotenv_path is not None and Path(dotenv_path).is_file():
        from dotenv import load_dotenv

        load_dotenv(dotenv_path, override=False)
    return load_settings(os.environ)


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Settings))
