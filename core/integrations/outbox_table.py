"""The outbox table, its row statuses and kinds, and how publish properties are kept in it (JSON)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy.dialects import mysql


PENDING, PROCESSING, PUBLISHED, FAILED, ABANDONED = "PENDING", "PROCESSING", "PUBLISHED", "FAILED", "ABANDONED"
STATUSES = (PENDING, PROCESSING, PUBLISHED, FAILED, ABANDONED)
MQTT, STREAM = "mqtt", "stream"
BACKOFF_CAP = 3600.0  # longest wait between two attempts, seconds
REDIS_PROBE_MIN, REDIS_PROBE_MAX = 0.2, 10.0  # backoff of the PING that tells when Redis is back, seconds

DATABASE_KEY = "database"
"""`Services.extras[DATABASE_KEY]`: the process's `core.integrations.database.Database`."""
OUTBOX_KEY = "outbox"
"""`Services.extras[OUTBOX_KEY]`: the process's `OutboxProcessor` (when OUTBOX_ENABLED)."""


def utcnow() -> datetime:
    """Naive UTC (every backend stores it the same way; all comparisons use this process's clock)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def outbox_table(name: str = "outbox", metadata: MetaData | None = None) -> Table:
    """The outbox table definition (one MetaData per table name)."""
    metadata = metadata if metadata is not None else MetaData()
    stamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    return Table(
        name, metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("kind", String(16), nullable=False),  # "mqtt" or "stream"
        Column("destination", Text, nullable=False),  # MQTT topic or stream name
        Column("payload", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False),
        Column("headers", Text, nullable=False),  # JSON: qos, retain, properties / stream fields
        Column("status", String(16), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", stamp, nullable=False),
        Column("locked_by", String(200)),
        Column("locked_until", stamp),
        Column("last_error", Text),
        Column("created_at", stamp, nullable=False),
        Column("published_at", stamp),
        Index(f"ix_{name}_status_due", "status", "next_attempt_at"),
        Index(f"ix_{name}_locked_by", "locked_by"),
    )


def json_safe_properties(properties: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in properties.items():
        if isinstance(value, bytes):
            out[key] = {"__bytes__": value.hex()}
        elif key == "user_properties" and isinstance(value, dict):
            out[key] = [[str(k), str(v)] for k, v in value.items()]
        else:
            out[key] = value
    return out


def restore_properties(properties: dict[str, Any]) -> dict[str, Any]:
    return {k: bytes.fromhex(v["__bytes__"]) if isinstance(v, dict) and "__bytes__" in v else v
            for k, v in properties.items()}


def short_error(exc: BaseException) -> str:
    """The first line of a database error (SQLAlchemy appends the whole statement and its parameters)."""
    return (str(exc).splitlines() or [""])[0][:500]
