"""The accounting transactions against each real store (SQLite file, PostgreSQL):
keys, limits, budgets, settling, recovery, migrations."""
from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from openai_adapter.accounts import manage
from openai_adapter.accounts.keys import PREFIX, digest
from openai_adapter.accounts.ledger import AuthError, Ledger, LimitExceeded, Principal, Usage
from openai_adapter.accounts.limits import Reserve, cost_micros, now_ms
from openai_adapter.accounts.schema import api_keys, budget_usage, ledger, reservations
from openai_adapter.accounts.store import SchemaOutOfDate, check_schema, make_engine, migrate


def _who(ledger_: Ledger, key: str) -> Principal:
    return ledger_.authenticate(key)


def _done(prompt: int, completion: int, outcome: str = "completed") -> Usage:
    return Usage(prompt, completion, outcome, 10, 100, "1")


def test_keys_are_random_prefixed_and_stored_only_as_hash(engine):
    new = manage.create_key(engine, "app")
    assert new.key.startswith(PREFIX) and len(new.key) >= len(PREFIX) + 43  # 32 bytes, base64
    with engine.connect() as conn:
        row = conn.execute(sa.select(api_keys)).one()
    assert row.key_hash == digest(new.key) and new.key not in json.dumps([str(v) for v in row])
    assert manage.create_key(engine, "other").key != new.key


def test_authenticate_refuses_unknown_revoked_expired(engine):
    lg = Ledger(engine)
    good = manage.create_key(engine, "good", models=["m1"])
    assert lg.authenticate(good.key) == Principal(good.id, "good", frozenset({"m1"}))
    with pytest.raises(AuthError, match="invalid API key"):
        lg.authenticate(good.key[:-1] + ("A" if good.key[-1] != "A" else "B"))
    with pytest.raises(AuthError, match="invalid API key"):
        lg.authenticate("not-a-key")
    manage.revoke_key(engine, "good")
    with pytest.raises(AuthError, match="revoked"):
        lg.authenticate(good.key)
    old = manage.create_key(engine, "old", expires_ms=now_ms() - 1)
    with pytest.raises(AuthError, match="expired"):
        lg.authenticate(old.key)


def test_settle_writes_one_ledger_row_and_is_idempotent(engine):
    lg = Ledger(engine)
    manage.set_price(engine, "m", 150_000, 600_000)  # 0.15 and 0.60 per million tokens
    new = manage.create_key(engine, "app")
    manage.set_budget(engine, "app", "day", "tokens", 1000)
    manage.set_budget(engine, "app", "total", "micros", 1_000_000)
    who = _who(lg, new.key)
    lg.admit(who, "r1", "m", Reserve(tokens=100, prompt=40, completion=60))
    state = {(r["period"], r["unit"]): r for r in manage.budget_state(engine, new.id)}
    assert state[("day", "tokens")]["reserved"] == 100
    assert state[("total", "micros")]["reserved"] == cost_micros(40, 60, 150_000, 600_000)
    assert lg.settle("r1", _done(30, 20)) is True
    assert lg.settle("r1", _done(30, 20)) is False  # the second time changes nothing
    with engine.connect() as conn:
        rows = conn.execute(sa.select(ledger)).all()
    assert len(rows) == 1 and rows[0].prompt_tokens == 30 and rows[0].completion_tokens == 20
    assert rows[0].cost_micros == cost_micros(30, 20, 150_000, 600_000) == 17  # 16.5 rounded up
    assert isinstance(rows[0].cost_micros, int)
    state = {(r["period"], r["unit"]): r for r in manage.budget_state(engine, new.id)}
    assert (state[("day", "tokens")]["reserved"], state[("day", "tokens")]["committed"]) == (0, 50)
    assert (state[("total", "micros")]["reserved"], state[("total", "micros")]["committed"]) == (0, 17)


def test_budget_refuses_what_could_overrun_it(engine):
    lg = Ledger(engine)
    new = manage.create_key(engine, "app")
    manage.set_budget(engine, "app", "total", "tokens", 250)
    who = _who(lg, new.key)
    lg.admit(who, "a", "m", Reserve(100, 10, 90))
    lg.admit(who, "b", "m", Reserve(100, 10, 90))
    with pytest.raises(LimitExceeded) as err:
        lg.admit(who, "c", "m", Reserve(100, 10, 90))
    assert err.value.code == "insufficient_quota" and "250" in err.value.message and "200" in err.value.message
    lg.settle("a", _done(10, 5))  # 85 of its 100 come back
    lg.admit(who, "c", "m", Reserve(100, 10, 90))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(reservations)).scalar() == 2


def test_requests_per_minute_bucket_with_headers(engine):
    lg = Ledger(engine)
    new = manage.create_key(engine, "app", rpm=2, tpm=1000)
    who = _who(lg, new.key)
    t = now_ms()
    first = lg.admit(who, "a", "m", Reserve(10, 5, 5), at_ms=t)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == "990"
    lg.admit(who, "b", "m", Reserve(10, 5, 5), at_ms=t)
    with pytest.raises(LimitExceeded) as err:
        lg.admit(who, "c", "m", Reserve(10, 5, 5), at_ms=t)
    e = err.value
    assert (e.code, e.kind, e.retry_after_s) == ("rate_limit_exceeded", "requests", 30)  # one request per 30 s
    assert "limit 2" in e.message and "used 2" in e.message and "30s" in e.message
    assert e.headers["x-ratelimit-remaining-requests"] == "0"
    lg.admit(who, "c", "m", Reserve(10, 5, 5), at_ms=t + 30_000)  # refilled


def test_tokens_per_minute_settles_to_the_real_count(engine):
    lg = Ledger(engine)
    new = manage.create_key(engine, "app", tpm=100)
    who = _who(lg, new.key)
    t = now_ms()
    lg.admit(who, "a", "m", Reserve(80, 10, 70), at_ms=t)
    with pytest.raises(LimitExceeded) as err:
        lg.admit(who, "b", "m", Reserve(80, 10, 70), at_ms=t)
    assert err.value.kind == "tokens"
    lg.settle("a", _done(10, 10), at_ms=t)  # used 20 of the 80 reserved: 60 come back
    lg.admit(who, "b", "m", Reserve(80, 10, 70), at_ms=t)
    with pytest.raises(LimitExceeded, match="Request too large"):
        lg.admit(who, "big", "m", Reserve(101, 1, 100), at_ms=t)


def test_concurrency_limit(engine):
    lg = Ledger(engine)
    new = manage.create_key(engine, "app", max_concurrent=1)
    who = _who(lg, new.key)
    lg.admit(who, "a", "m", Reserve(1, 1, 0))
    with pytest.raises(LimitExceeded) as err:
        lg.admit(who, "b", "m", Reserve(1, 1, 0))
    assert err.value.code == "rate_limit_exceeded" and "concurrent" in err.value.message
    lg.release("a")
    lg.admit(who, "b", "m", Reserve(1, 1, 0))


def test_release_bills_nothing(engine):
    lg = Ledger(engine)
    new = manage.create_key(engine, "app")
    manage.set_budget(engine, "app", "month", "tokens", 100)
    lg.admit(_who(lg, new.key), "a", "m", Reserve(60, 10, 50))
    assert lg.release("a") and not lg.release("a")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger)).scalar() == 0
        assert conn.execute(sa.select(budget_usage.c.reserved, budget_usage.c.committed)).one() == (0, 0)


def test_recovery_charges_dead_instances_as_reserved(engine):
    dead = Ledger(engine, instance_id="dead-instance")
    dead.pid = 2**22 + 12345  # no such process on this host
    dead.heartbeat()
    new = manage.create_key(engine, "app")
    manage.set_budget(engine, "app", "total", "tokens", 1000)
    dead.admit(dead.authenticate(new.key), "lost", "m", Reserve(100, 30, 70))
    alive = Ledger(engine)
    alive.heartbeat()
    alive.admit(alive.authenticate(new.key), "mine", "m", Reserve(100, 30, 70))
    assert alive.recover(stale_ms=60_000) == 1
    assert alive.recover(stale_ms=60_000) == 0
    with engine.connect() as conn:
        row = conn.execute(sa.select(ledger)).one()
        open_ = [r.request_id for r in conn.execute(sa.select(reservations))]
    assert (row.request_id, row.outcome, row.prompt_tokens + row.completion_tokens) == ("lost", "crash_recovered", 100)
    assert open_ == ["mine"]  # a live instance's reservation is not touched
    usage = manage.budget_state(engine, new.id)[0]
    assert (usage["committed"], usage["reserved"]) == (100, 100)


def test_stale_heartbeat_on_another_host_is_recovered(engine):
    other = Ledger(engine, instance_id="other-host")
    other.host = "some-other-host"
    t = now_ms()
    other.heartbeat(at_ms=t - 20_000)
    other.admit(Principal(None, "anonymous"), "x", "m", Reserve(5, 5, 0))
    me = Ledger(engine)
    assert me.recover(stale_ms=60_000, at_ms=t) == 0  # 20 s old: maybe only slow
    assert me.recover(stale_ms=15_000, at_ms=t) == 1


def test_usage_report_by_key_day_and_model(engine):
    lg = Ledger(engine)
    a = manage.create_key(engine, "a")
    for i, model in enumerate(["m1", "m1", "m2"]):
        lg.admit(lg.authenticate(a.key), f"r{i}", model, Reserve(10, 5, 5))
        lg.settle(f"r{i}", _done(3, 4))
    by_model = {r["model"]: r for r in manage.usage(engine, by="model")}
    assert by_model["m1"]["requests"] == 2 and by_model["m1"]["prompt_tokens"] == 6
    (day,) = manage.usage(engine, by="day")
    assert day["requests"] == 3 and len(day["day"]) == 10


def test_schema_check_names_the_command(db_url):
    e = make_engine(db_url)
    with pytest.raises(SchemaOutOfDate, match="llm-admin migrate"):
        check_schema(e)
    assert migrate(e) == (None, "0002")
    check_schema(e)
    assert migrate(e) == ("0002", "0002")
    e.dispose()


def test_replicas_migrating_at_once_do_not_race(db_url):
    import threading
    results, errors = [], []

    def start() -> None:
        e = make_engine(db_url)
        try:
            results.append(migrate(e)[1])
        except Exception as err:  # pragma: no cover - the failure this test is for
            errors.append(err)
        finally:
            e.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == ["0002"] * 4
