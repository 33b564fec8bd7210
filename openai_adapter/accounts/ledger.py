"""The accounting of requests, in the database, one transaction per step:

    admit    checks the key's limits and budgets, reserves the request's largest
             possible use (tokens, money, a concurrency slot) and records a reservation
    settle   replaces the reservation with the real use: one ledger row, budgets moved
             from reserved to committed, unused tokens back in the per-minute bucket
    release  drops a reservation of a request that never ran (refused for capacity)
    recover  settles, as reserved, the reservations of adapter processes that died

Nothing is kept in memory between steps, so a crash loses nothing: an open reservation
stays in the database until some adapter recovers it. Everything is idempotent by
request id (settling twice changes nothing the second time).
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Optional

import sqlalchemy as sa

from . import keys as keylib
from .limits import Bucket, Reserve, cost_micros, format_reset, now_ms, spans
from .schema import api_keys, budget_usage, budgets, instances, ledger, prices, rate_buckets, reservations
from .store import is_postgres

OUTCOMES = ("completed", "length", "cancelled", "failed", "crash_recovered")


@dataclass(frozen=True)
class Principal:
    """Who is calling. key_id None: a static key (ADAPTER_API_KEYS) or open mode."""

    key_id: Optional[int]
    label: str
    allowed_models: Optional[frozenset[str]] = None

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


class AuthError(Exception):
    """401: the message says which (unknown, revoked, expired)."""


@dataclass
class LimitExceeded(Exception):
    """429. kind: requests | tokens (rate_limit_exceeded) or a budget (insufficient_quota)."""

    code: str  # rate_limit_exceeded | insufficient_quota
    kind: str
    message: str
    retry_after_s: Optional[int]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Admitted:
    request_id: str
    headers: dict[str, str]  # x-ratelimit-* for the key


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    outcome: str
    ttft_ms: Optional[int]
    duration_ms: int
    model_version: str = ""


class Ledger:
    """The accounting steps over one SQLAlchemy engine (synchronous; the adapter calls
    them from a thread pool)."""

    def __init__(self, engine: sa.Engine, instance_id: Optional[str] = None) -> None:
        self.engine = engine
        self.pg = is_postgres(engine)
        self.instance_id = instance_id or str(uuid.uuid4())
        self.host, self.pid = socket.gethostname(), os.getpid()

    # -- keys ---------------------------------------------------------------------
    def any_key(self) -> bool:
        """Whether any key was ever created (revoked ones count: revoking the last key
        must not open the service)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(api_keys.c.id).limit(1)).first() is not None

    def authenticate(self, token: str, at_ms: Optional[int] = None) -> Principal:
        at_ms = now_ms() if at_ms is None else at_ms
        if not keylib.looks_like_key(token):
            raise AuthError("invalid API key")
        digest = keylib.digest(token)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == digest)).first()
        if row is None:
            raise AuthError("invalid API key")
        if row.revoked_ms is not None:
            raise AuthError(f"the API key {row.key_hint} was revoked")
        if row.expires_ms is not None and row.expires_ms <= at_ms:
            raise AuthError(f"the API key {row.key_hint} has expired")
        allowed = frozenset(m for m in row.allowed_models.split(",") if m) if row.allowed_models else None
        return Principal(row.id, row.name, allowed)

    # -- admission ----------------------------------------------------------------
    def admit(self, who: Principal, request_id: str, model: str, reserve: Reserve,
              at_ms: Optional[int] = None) -> Admitted:
        """Reserve the request's bounds or raise LimitExceeded (nothing reserved then)."""
        at_ms = now_ms() if at_ms is None else at_ms
        with self.engine.begin() as conn:
            p_price, c_price = self._price(conn, model)
            micros = cost_micros(reserve.prompt, reserve.completion, p_price, c_price)
            headers: dict[str, str] = {}
            windows: list[list[str]] = []
            if who.key_id is not None:
                key = self._lock_key(conn, who.key_id)
                if key is None or key.revoked_ms is not None:
                    raise AuthError(f"the API key {key.key_hint if key else ''} was revoked")
                if key.expires_ms is not None and key.expires_ms <= at_ms:
                    raise AuthError(f"the API key {key.key_hint} has expired")
                headers = self._take_rate(conn, key, reserve.tokens, at_ms)
                if key.max_concurrent is not None:
                    running = conn.execute(sa.select(sa.func.count()).select_from(reservations)
                                           .where(reservations.c.key_id == key.id)).scalar_one()
                    if running >= key.max_concurrent:
                        raise LimitExceeded("rate_limit_exceeded", "concurrency",
                                            f"Rate limit reached for concurrent requests: limit {key.max_concurrent}, "
                                            f"running {running}. Retry when one of them has finished.", 1, headers)
                windows = self._reserve_budgets(conn, key.id, reserve.tokens, micros, at_ms, headers)
            conn.execute(reservations.insert().values(
                request_id=request_id, instance_id=self.instance_id, key_id=who.key_id, key_label=who.label,
                model=model, tokens=reserve.tokens, prompt_tokens=min(reserve.prompt, reserve.tokens),
                micros=micros, prompt_price=p_price, completion_price=c_price, windows=json.dumps(windows),
                created_ms=at_ms))
        return Admitted(request_id, headers)

    def _price(self, conn: sa.Connection, model: str) -> tuple[int, int]:
        rows = {r.model: r for r in conn.execute(sa.select(prices).where(prices.c.model.in_([model, "*"])))}
        row = rows.get(model) or rows.get("*")
        return (row.prompt_micros_per_mtok, row.completion_micros_per_mtok) if row else (0, 0)

    def _lock_key(self, conn: sa.Connection, key_id: int):
        q = sa.select(api_keys).where(api_keys.c.id == key_id)
        if self.pg:
            # One key's admissions in turn, across every replica. NO KEY UPDATE, not
            # UPDATE: a settlement's ledger insert takes KEY SHARE on this row for its
            # foreign key, and must not wait for an admission that waits for it.
            q = q.with_for_update(key_share=True)
        return conn.execute(q).first()

    def _buckets(self, conn: sa.Connection, key_id: int, limits: dict[str, int], at_ms: int) -> dict[str, Bucket]:
        """The key's buckets of the given kinds, refilled to `at_ms` (full if new)."""
        q = sa.select(rate_buckets).where(rate_buckets.c.key_id == key_id)
        if self.pg:
            q = q.with_for_update()  # a concurrent settlement's refund waits, and is not overwritten
        rows = {r.kind: r for r in conn.execute(q)}
        out = {}
        for kind, limit in limits.items():
            row = rows.get(kind)
            b = Bucket.full(limit, at_ms) if row is None else Bucket(limit, row.level_milli, row.updated_ms)
            b.refill(at_ms)
            out[kind] = b
        return out

    def _save_bucket(self, conn: sa.Connection, key_id: int, kind: str, b: Bucket) -> None:
        done = conn.execute(rate_buckets.update().where(rate_buckets.c.key_id == key_id, rate_buckets.c.kind == kind)
                            .values(level_milli=b.level_milli, updated_ms=b.updated_ms)).rowcount
        if not done:
            conn.execute(rate_buckets.insert().values(key_id=key_id, kind=kind, level_milli=b.level_milli,
                                                      updated_ms=b.updated_ms))

    def _take_rate(self, conn: sa.Connection, key, tokens: int, at_ms: int) -> dict[str, str]:
        limits = {k: v for k, v in (("requests", key.rpm_limit), ("tokens", key.tpm_limit)) if v is not None}
        if not limits:
            return {}
        buckets = self._buckets(conn, key.id, limits, at_ms)
        amounts = {"requests": 1, "tokens": tokens}
        headers: dict[str, str] = {}
        for kind, b in buckets.items():  # check all before taking any
            amount = amounts[kind]
            if b.level_milli < amount * 1000:
                for k2, b2 in buckets.items():
                    headers.update(_rate_headers(k2, b2))
                wait = b.wait_ms(amount)
                if amount > b.limit:
                    msg = (f"Request too large for tokens per min (TPM): limit {b.limit}, requested {amount}. "
                           "Send fewer prompt tokens or a lower max_tokens.")
                    retry = None
                else:
                    msg = (f"Rate limit reached for {kind} per min: limit {b.limit}, used {b.limit - b.remaining}, "
                           f"requested {amount}. Please try again in {format_reset(wait)}.")
                    retry = max(1, -(-wait // 1000))
                raise LimitExceeded("rate_limit_exceeded", kind, msg, retry, headers)
        for kind, b in buckets.items():
            b.take(amounts[kind])
            self._save_bucket(conn, key.id, kind, b)
            headers.update(_rate_headers(kind, b))
        return headers

    def _reserve_budgets(self, conn: sa.Connection, key_id: int, tokens: int, micros: int, at_ms: int,
                         headers: dict[str, str]) -> list[list[str]]:
        span_of = spans(at_ms)
        windows: list[list[str]] = []
        for b in conn.execute(sa.select(budgets).where(budgets.c.key_id == key_id)).all():
            span = span_of[b.period]
            amount = tokens if b.unit == "tokens" else micros
            ids = dict(key_id=key_id, period=b.period, unit=b.unit, span=span)
            # One conditional statement: two replicas cannot both take the last of a budget.
            take = (budget_usage.update()
                    .where(*_match(ids), budget_usage.c.committed + budget_usage.c.reserved + amount <= b.amount)
                    .values(reserved=budget_usage.c.reserved + amount))
            took = conn.execute(take).rowcount
            if not took and conn.execute(sa.select(budget_usage.c.committed).where(*_match(ids))).first() is None:
                conn.execute(budget_usage.insert().values(**ids, committed=0, reserved=0))  # a new day or month
                took = conn.execute(take).rowcount
            if not took:
                used = conn.execute(sa.select(budget_usage.c.committed + budget_usage.c.reserved)
                                    .where(*_match(ids))).scalar_one()
                what = "tokens" if b.unit == "tokens" else "micro-units"
                per = {"day": "daily", "month": "monthly", "total": "total"}[b.period]
                raise LimitExceeded("insufficient_quota", f"budget_{b.period}_{b.unit}",
                                    f"You exceeded your {per} budget of {b.amount} {what} ({span}): {used} used or "
                                    f"reserved, this request may need {amount}.", None, headers)
            windows.append([b.period, b.unit, span])
        return windows

    # -- the end of a request -----------------------------------------------------
    def settle(self, request_id: str, usage: Usage, at_ms: Optional[int] = None) -> bool:
        """Replace the reservation by the real use. False if it was already settled."""
        at_ms = now_ms() if at_ms is None else at_ms
        with self.engine.begin() as conn:
            res = self._take_reservation(conn, request_id)
            if res is None:
                return False
            self._settle(conn, res, usage, at_ms)
        return True

    def release(self, request_id: str, at_ms: Optional[int] = None) -> bool:
        """Drop the reservation of a request that never ran: nothing billed, nothing in
        the ledger; budgets and tokens given back (the request still counted)."""
        at_ms = now_ms() if at_ms is None else at_ms
        with self.engine.begin() as conn:
            res = self._take_reservation(conn, request_id)
            if res is None:
                return False
            self._unreserve(conn, res, 0, 0, at_ms)
        return True

    def _take_reservation(self, conn: sa.Connection, request_id: str):
        """Remove the reservation and return it, or None if it is gone (settled, released or
        recovered by someone else): the delete decides, so a request is settled once."""
        return conn.execute(reservations.delete().where(reservations.c.request_id == request_id)
                            .returning(*reservations.c)).first()

    def _settle(self, conn: sa.Connection, res, usage: Usage, at_ms: int) -> None:
        tokens = usage.prompt_tokens + usage.completion_tokens
        cost = cost_micros(usage.prompt_tokens, usage.completion_tokens, res.prompt_price, res.completion_price)
        self._unreserve(conn, res, tokens, cost, at_ms)
        conn.execute(ledger.insert().values(
            request_id=res.request_id, key_id=res.key_id, key_label=res.key_label, model=res.model,
            model_version=usage.model_version, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, outcome=usage.outcome, ttft_ms=usage.ttft_ms,
            duration_ms=usage.duration_ms, cost_micros=cost, started_ms=res.created_ms, ended_ms=at_ms))

    def _unreserve(self, conn: sa.Connection, res, tokens: int, cost: int, at_ms: int) -> None:
        # Locks in admission's order (bucket rows, then budget rows): no deadlock between
        # a settlement and an admission of the same key on PostgreSQL.
        if res.key_id is not None and tokens < res.tokens:
            # Unused tokens back into the tokens-per-minute bucket, in one statement
            # (capped at the limit), so settling needs no lock on the key.
            back = (res.tokens - tokens) * 1000
            limit = sa.select(api_keys.c.tpm_limit * 1000).where(api_keys.c.id == res.key_id).scalar_subquery()
            level = rate_buckets.c.level_milli + back
            conn.execute(rate_buckets.update()
                         .where(rate_buckets.c.key_id == res.key_id, rate_buckets.c.kind == "tokens")
                         .values(level_milli=sa.case((level > limit, limit), else_=level)))
        for period, unit, span in json.loads(res.windows):
            reserved = res.tokens if unit == "tokens" else res.micros
            used = tokens if unit == "tokens" else cost
            conn.execute(budget_usage.update()
                         .where(*_match(dict(key_id=res.key_id, period=period, unit=unit, span=span)))
                         .values(reserved=budget_usage.c.reserved - reserved,
                                 committed=budget_usage.c.committed + used))

    # -- processes and crash recovery ---------------------------------------------
    def heartbeat(self, at_ms: Optional[int] = None) -> None:
        at_ms = now_ms() if at_ms is None else at_ms
        with self.engine.begin() as conn:
            done = conn.execute(instances.update().where(instances.c.id == self.instance_id)
                                .values(heartbeat_ms=at_ms)).rowcount
            if not done:
                conn.execute(instances.insert().values(id=self.instance_id, host=self.host, pid=self.pid,
                                                       started_ms=at_ms, heartbeat_ms=at_ms))

    def leave(self) -> None:
        """A clean stop: our reservations are settled by then; forget this instance."""
        with self.engine.begin() as conn:
            conn.execute(instances.delete().where(instances.c.id == self.instance_id))

    def recover(self, stale_ms: int, at_ms: Optional[int] = None) -> int:
        """Settle, as reserved and marked crash_recovered, every reservation of an adapter
        process that is gone: one on this host whose pid is not running (or is ours: a
        restarted container), or one whose heartbeat is older than `stale_ms`."""
        at_ms = now_ms() if at_ms is None else at_ms
        with self.engine.connect() as conn:
            alive = {r.id: r for r in conn.execute(sa.select(instances))}
            owners = {r[0] for r in conn.execute(sa.select(reservations.c.instance_id).distinct())}
        dead = [i for i in owners if i != self.instance_id and self._is_dead(alive.get(i), stale_ms, at_ms)]
        n = 0
        for inst in dead:
            with self.engine.connect() as conn:
                ids = [r[0] for r in conn.execute(sa.select(reservations.c.request_id)
                                                  .where(reservations.c.instance_id == inst))]
            for rid in ids:
                with self.engine.begin() as conn:
                    res = self._take_reservation(conn, rid)
                    if res is None:
                        continue  # another replica recovered it first
                    prompt = min(res.prompt_tokens, res.tokens)
                    self._settle(conn, res, Usage(prompt, res.tokens - prompt, "crash_recovered", None,
                                                  max(0, at_ms - res.created_ms)), at_ms)
                    n += 1
            with self.engine.begin() as conn:
                conn.execute(instances.delete().where(instances.c.id == inst))
        return n

    def _is_dead(self, inst, stale_ms: int, at_ms: int) -> bool:
        if inst is None:
            return True
        if inst.host == self.host:
            if inst.pid == self.pid:
                return True  # our pid, another instance id: we were restarted
            try:
                os.kill(inst.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return at_ms - inst.heartbeat_ms > stale_ms


def _match(ids: dict):
    return [budget_usage.c[k] == v for k, v in ids.items()]


def _rate_headers(kind: str, b: Bucket) -> dict[str, str]:
    return {f"x-ratelimit-limit-{kind}": str(b.limit), f"x-ratelimit-remaining-{kind}": str(b.remaining),
            f"x-ratelimit-reset-{kind}": format_reset(b.reset_ms())}
