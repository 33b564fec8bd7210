"""The database: engine set-up for SQLite and PostgreSQL, and Alembic migrations.

SQLite runs in write-ahead-log mode with full sync (a committed ledger row survives a
crash of the process and of the machine), and every write transaction starts with
`BEGIN IMMEDIATE`, so two processes never deadlock upgrading a read lock. On
PostgreSQL, admission locks the key's row, so one key's checks are serialized across
every replica while different keys proceed in parallel.
"""
from __future__ import annotations

import itertools
import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).with_name("migrations")


class SchemaOutOfDate(RuntimeError):
    pass


def normalize_url(url: str) -> str:
    """postgresql:// and postgres:// use psycopg 3; sqlite:///relative stays relative to the cwd."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> sa.Engine:
    url = normalize_url(url)
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:///PATH or postgresql://…")
    return sa.create_engine(parsed, pool_size=8, max_overflow=8, pool_pre_ping=True)


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False,
                                                 "isolation_level": None}, pool_size=8, max_overflow=8)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        # Switching to WAL takes an exclusive lock and SQLite answers "database is locked"
        # at once instead of waiting (no busy handler): replicas starting together on a new
        # file hit it, so wait for the lock here.
        for attempt in itertools.count():
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt >= 600:
                    raise
                time.sleep(0.05)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # The driver is in autocommit mode (isolation_level=None): we say how to begin.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_postgres(engine: sa.Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _config(connection: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_config(None)).get_current_head()  # type: ignore[arg-type]


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: sa.Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; returns (before, after)."""
    with engine.begin() as conn:
        if is_postgres(engine):
            # Replicas that start together migrate one after the other (the others then
            # find the schema current); released when this transaction ends.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7242610001)"))
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(_config(conn), "head")
    return before, head_revision()


def check_schema(engine: sa.Engine) -> None:
    """Raise SchemaOutOfDate, naming the command, unless the schema is current."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDate(f"the accounts database is at schema revision {current or 'none'}, this adapter "
                              f"needs {head}: run `llm-admin migrate` (or start with ADAPTER_DB_MIGRATE=true)")
