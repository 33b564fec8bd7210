"""Fixtures of the accounts tests: a database URL for each real store (a SQLite file;
a PostgreSQL 16 server that the suite starts itself from the pgserver wheel), and the
adapter test helpers."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())  # pgserver asks platformdirs for it

_spec2 = importlib.util.spec_from_file_location("accounts_testlib", Path(__file__).with_name("accounts_testlib.py"))
_lib2 = importlib.util.module_from_spec(_spec2)
sys.modules["accounts_testlib"] = _lib2
_spec2.loader.exec_module(_lib2)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL server for the session. Not skipped when missing: pgserver is a
    pinned test dependency, so a failure to start is a failure."""
    import pgserver
    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server
    server.cleanup()


def _new_pg_database(server) -> str:
    import psycopg
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = server.get_uri()  # postgresql://postgres:@/postgres?host=/tmp/...
    head, _, query = base.partition("?")
    return head.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")


@pytest.fixture
def new_pg_url(postgres_server):
    """A factory of fresh, empty PostgreSQL databases."""
    return lambda: _new_pg_database(postgres_server)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/accounts.db"
    return _new_pg_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def engine(db_url):
    from openai_adapter.accounts.store import make_engine, migrate
    e = make_engine(db_url)
    migrate(e)
    yield e
    e.dispose()
