"""Property-based: any sequence of admissions, settlements, releases, repeated
settlements and adapter crashes keeps the books right, on a real SQLite file and a
real PostgreSQL database:

    committed + reserved <= the budget
    reserved  == the sum of the open reservations
    committed == the sum of the ledger
"""
from __future__ import annotations

import json
import tempfile
import uuid

import sqlalchemy as sa
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from openai_adapter.accounts import manage
from openai_adapter.accounts.ledger import Ledger, LimitExceeded, Usage
from openai_adapter.accounts.limits import Reserve
from openai_adapter.accounts.schema import budget_usage, ledger, reservations
from openai_adapter.accounts.store import make_engine, migrate

TOKENS_BUDGET = 1000
MONEY_BUDGET = 700  # micro-units; the price makes a token cost one micro-unit
DEAD_PID = 2**22 + 4321


def machine_for(url_factory):
    class Books(RuleBasedStateMachine):
        requests = Bundle("requests")

        def __init__(self) -> None:
            super().__init__()
            self.engine = make_engine(url_factory())
            migrate(self.engine)
            manage.set_price(self.engine, "m", 1_000_000, 1_000_000)
            key = manage.create_key(self.engine, "k")
            manage.set_budget(self.engine, "k", "total", "tokens", TOKENS_BUDGET)
            manage.set_budget(self.engine, "k", "day", "micros", MONEY_BUDGET)
            self.ledger = self._instance()
            self.who = self.ledger.authenticate(key.key)
            self.reserved: dict[str, int] = {}  # the model's view: open request -> tokens reserved

        def _instance(self) -> Ledger:
            lg = Ledger(self.engine, instance_id=str(uuid.uuid4()))
            lg.heartbeat()
            return lg

        @rule(target=requests, prompt=st.integers(0, 300), completion=st.integers(0, 300))
        def admit(self, prompt, completion):
            rid = uuid.uuid4().hex
            try:
                self.ledger.admit(self.who, rid, "m", Reserve(prompt + completion, prompt, completion))
            except LimitExceeded:
                return rid  # refused: nothing reserved
            self.reserved[rid] = prompt + completion
            return rid

        @rule(rid=consumes(requests), used=st.floats(0, 1), outcome=st.sampled_from(["completed", "cancelled"]))
        def settle(self, rid, used, outcome):
            if rid not in self.reserved:
                assert self.ledger.settle(rid, Usage(0, 0, outcome, None, 1)) is False
                return
            total = int(self.reserved[rid] * used)
            assert self.ledger.settle(rid, Usage(total // 2, total - total // 2, outcome, 1, 2))
            assert self.ledger.settle(rid, Usage(total // 2, total - total // 2, outcome, 1, 2)) is False
            del self.reserved[rid]

        @rule(rid=consumes(requests))
        def release(self, rid):
            assert self.ledger.release(rid) is (rid in self.reserved)
            self.reserved.pop(rid, None)

        @rule()
        def crash_and_restart(self):
            self.ledger.pid = DEAD_PID  # the process is gone (and never said goodbye)
            with self.engine.begin() as conn:
                conn.execute(sa.text("UPDATE instances SET pid = :p WHERE id = :i"),
                             {"p": DEAD_PID, "i": self.ledger.instance_id})
            self.ledger = self._instance()
            self.ledger.recover(stale_ms=60_000)
            self.reserved.clear()  # all settled as reserved

        @invariant()
        def books_balance(self):
            with self.engine.connect() as conn:
                usage = {r.unit: r for r in conn.execute(sa.select(budget_usage))}
                open_ = conn.execute(sa.select(reservations)).all()
                rows = conn.execute(sa.select(ledger)).all()
            assert {r.request_id for r in open_} == set(self.reserved)
            limits = {"tokens": TOKENS_BUDGET, "micros": MONEY_BUDGET}
            for unit, u in usage.items():
                assert u.committed + u.reserved <= limits[unit]
                assert u.reserved == sum((r.tokens if unit == "tokens" else r.micros) for r in open_)
                assert u.committed == sum((r.prompt_tokens + r.completion_tokens) if unit == "tokens"
                                          else r.cost_micros for r in rows)
                assert all(json.loads(r.windows) for r in open_)

        def teardown(self):
            self.engine.dispose()

    return Books


def test_books_balance_on_sqlite():
    Books = machine_for(lambda: f"sqlite:///{tempfile.mkdtemp(prefix='books-')}/a.db")
    Books.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None, derandomize=True,
                                       suppress_health_check=[HealthCheck.too_slow])
    Books.TestCase().runTest()


def test_books_balance_on_postgres(new_pg_url):
    Books = machine_for(new_pg_url)
    Books.TestCase.settings = settings(max_examples=10, stateful_step_count=20, deadline=None, derandomize=True,
                                       suppress_health_check=[HealthCheck.too_slow])
    Books.TestCase().runTest()
