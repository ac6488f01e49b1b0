"""The SQLAlchemy engine and sessions of one process (SQLite, PostgreSQL, MySQL/MariaDB, all async).

Each process builds its own `Database` after it started (engines do not survive a fork or
spawn). App models subclass `Base`; with DATABASE_CREATE_TABLES (the default) their tables and
the outbox table are created at start when missing — see docs/outbox.md for migrations.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

log = logging.getLogger("core.database")

SQLITE_BUSY_TIMEOUT_S = 30.0


class Base(DeclarativeBase):
    """Base class of the app's ORM models (`app/models`); their tables are created at start."""


class DatabaseError(RuntimeError):
    """The database cannot be reached or prepared; the message names DATABASE_URL (without password)."""


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is reported as given, minus nothing secret to hide
        return url.split("@")[-1]


def _engine_options(url: str) -> dict[str, Any]:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if backend in ("mysql", "mariadb"):
        return {"pool_pre_ping": True, "pool_recycle": 3600}
    return {"pool_pre_ping": True}


def _prepare_sqlite(engine: AsyncEngine) -> None:
    """WAL (readers never block the writer), and BEGIN IMMEDIATE for every transaction.

    pysqlite starts transactions lazily and a deferred transaction that reads and then writes
    fails at once with "database is locked" when another process wrote in between; taking the
    write lock at BEGIN makes concurrent writers from several processes wait (busy timeout) instead.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Engine + session factory for DATABASE_URL."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url, echo=echo, **_engine_options(url))
        self.backend = self.engine.dialect.name  # "sqlite", "postgresql", "mysql" or "mariadb"
        if self.backend == "sqlite":
            _prepare_sqlite(self.engine)
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_mysql(self) -> bool:
        return self.backend in ("mysql", "mariadb")

    def session(self) -> AsyncSession:
        return self.sessions()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def create_tables(self, *metadatas: MetaData, attempts: int = 5) -> None:
        """CREATE TABLE for what is missing. Several processes may race here; the loser checks again."""
        for attempt in range(attempts):
            try:
                async with self.engine.begin() as conn:
                    for metadata in metadatas:
                        await conn.run_sync(metadata.create_all, checkfirst=True)
                return
            except (SQLAlchemyError, OSError) as exc:
                if attempt == attempts - 1 or not _lost_a_race(exc):
                    first_line = (str(exc).splitlines() or [""])[0]
                    raise DatabaseError(f"DATABASE_URL={safe_url(self.url)}: cannot create tables: "
                                        f"{type(exc).__name__}: {first_line}") from exc
                log.info("creating tables raced with another process (%s); checking again", type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))

    async def dispose(self) -> None:
        await self.engine.dispose()

    def __repr__(self) -> str:
        return f"<Database {safe_url(self.url)}>"


def _lost_a_race(exc: BaseException) -> bool:
    """Another process created the same table (or its type/index) between our check and our CREATE."""
    text_ = str(exc).lower()
    return "already exists" in text_ or "duplicate" in text_ or "unique" in text_
