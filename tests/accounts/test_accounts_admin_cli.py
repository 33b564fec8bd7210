"""`llm-admin` through its console entry point, on each real store."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import sqlalchemy as sa

from openai_adapter.accounts.ledger import Ledger, Usage
from openai_adapter.accounts.limits import Reserve
from openai_adapter.accounts.schema import api_keys, budgets
from openai_adapter.accounts.store import make_engine


def admin(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openai_adapter.accounts.admin", "--database-url", url, *args],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


def test_admin_cli_end_to_end(db_url):
    old = admin(db_url, "keys", "list")
    assert old.returncode == 2 and "llm-admin migrate" in old.stderr  # an empty database is not used as is
    assert admin(db_url, "migrate").returncode == 0
    made = admin(db_url, "keys", "create", "app", "--owner", "team-a", "--rpm", "60", "--tpm", "1000",
                 "--concurrency", "2", "--models", "m1,m2", "--budget", "day:5000", "--budget", "month:$2.50",
                 "--expires", "30d")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("sk-llm-") and "only time" in made.stderr
    e = make_engine(db_url)
    with e.connect() as conn:
        row = conn.execute(sa.select(api_keys)).one()
        spent = {(b.period, b.unit): b.amount for b in conn.execute(sa.select(budgets))}
    assert (row.rpm_limit, row.tpm_limit, row.max_concurrent, row.allowed_models) == (60, 1000, 2, "m1,m2")
    assert spent == {("day", "tokens"): 5000, ("month", "micros"): 2_500_000}  # money as integer micro-units
    assert key not in admin(db_url, "keys", "list").stdout  # hints only
    listed = json.loads(admin(db_url, "keys", "list", "--format", "json").stdout)
    assert listed[0]["status"] == "active" and listed[0]["key"].startswith("sk-llm-")
    assert admin(db_url, "keys", "update", "app", "--rpm", "none", "--models", "*").returncode == 0
    with e.connect() as conn:
        row = conn.execute(sa.select(api_keys)).one()
    assert row.rpm_limit is None and row.allowed_models is None and row.tpm_limit == 1000  # the rest unchanged
    assert admin(db_url, "prices", "set", "m1", "--prompt", "0.15", "--completion", "0.6").returncode == 0
    assert "0.150000" in admin(db_url, "prices", "list").stdout
    bad = admin(db_url, "prices", "set", "m1", "--prompt", "0.0000001", "--completion", "1")
    assert bad.returncode == 2 and "6 decimals" in bad.stderr
    lg = Ledger(e)
    lg.admit(lg.authenticate(key), "r1", "m1", Reserve(100, 50, 50))
    lg.settle("r1", Usage(40, 60, "completed", 5, 50, "1"))
    rows = list(csv.DictReader(io.StringIO(admin(db_url, "usage", "--by", "key-model", "--format", "csv").stdout)))
    assert rows == [{"key_label": "app", "model": "m1", "requests": "1", "prompt_tokens": "40",
                     "completion_tokens": "60", "cost": "0.000042"}]  # 40 x 0.15 + 60 x 0.6 per million
    assert "tokens" in admin(db_url, "budgets", "show", "app").stdout
    assert admin(db_url, "keys", "revoke", "app").returncode == 0
    assert json.loads(admin(db_url, "keys", "list", "--format", "json").stdout)[0]["status"] == "revoked"
    missing = admin(db_url, "keys", "revoke", "nobody")
    assert missing.returncode == 2 and "no key 'nobody'" in missing.stderr
    e.dispose()
