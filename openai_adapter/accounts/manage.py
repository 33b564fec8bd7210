"""Administration of keys, budgets, limits and prices, and usage reports (llm-admin
and tests call these; the adapter never does)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import sqlalchemy as sa

from . import keys as keylib
from .limits import PERIODS, UNITS, now_ms
from .schema import api_keys, budget_usage, budgets, ledger, prices, reservations

_UNSET: Any = object()


@dataclass
class NewKey:
    id: int
    key: str  # shown once: only its hash is stored
    hint: str


class NotFound(LookupError):
    pass


def create_key(engine: sa.Engine, name: str, *, owner: str = "", expires_ms: Optional[int] = None,
               models: Optional[Iterable[str]] = None, rpm: Optional[int] = None, tpm: Optional[int] = None,
               max_concurrent: Optional[int] = None) -> NewKey:
    key = keylib.generate()
    with engine.begin() as conn:
        kid = conn.execute(api_keys.insert().values(
            key_hash=keylib.digest(key), key_hint=keylib.hint(key), name=name, owner=owner, created_ms=now_ms(),
            expires_ms=expires_ms, allowed_models=_models(models), rpm_limit=rpm, tpm_limit=tpm,
            max_concurrent=max_concurrent)).inserted_primary_key[0]
    return NewKey(kid, key, keylib.hint(key))


def _models(models: Optional[Iterable[str]]) -> Optional[str]:
    if models is None:
        return None
    names = [m.strip() for m in models if m.strip()]
    return ",".join(names) if names else None


def find_key(engine: sa.Engine, ref: str):
    """A key by id, by name, or by the key itself."""
    with engine.connect() as conn:
        if ref.isdigit():
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == int(ref))).first()
        elif keylib.looks_like_key(ref):
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == keylib.digest(ref))).first()
        else:
            rows = conn.execute(sa.select(api_keys).where(api_keys.c.name == ref)).all()
            if len(rows) > 1:
                raise NotFound(f"{len(rows)} keys are named {ref!r}; use the id")
            row = rows[0] if rows else None
    if row is None:
        raise NotFound(f"no key {ref!r}")
    return row


def list_keys(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(api_keys).order_by(api_keys.c.id)).all()
        budget_rows = conn.execute(sa.select(budgets)).all()
    out = []
    for r in rows:
        d = dict(r._mapping)
        d.pop("key_hash")
        d["budgets"] = {f"{b.period}_{b.unit}": b.amount for b in budget_rows if b.key_id == r.id}
        out.append(d)
    return out


def revoke_key(engine: sa.Engine, ref: str) -> int:
    row = find_key(engine, ref)
    with engine.begin() as conn:
        conn.execute(api_keys.update().where(api_keys.c.id == row.id, api_keys.c.revoked_ms.is_(None))
                     .values(revoked_ms=now_ms()))
    return row.id


def update_key(engine: sa.Engine, ref: str, *, name: Any = _UNSET, owner: Any = _UNSET, expires_ms: Any = _UNSET,
               models: Any = _UNSET, rpm: Any = _UNSET, tpm: Any = _UNSET, max_concurrent: Any = _UNSET) -> int:
    """Change what is given; None clears a limit (no limit)."""
    row = find_key(engine, ref)
    values: dict[str, Any] = {}
    for col, v in (("name", name), ("owner", owner), ("expires_ms", expires_ms), ("rpm_limit", rpm),
                   ("tpm_limit", tpm), ("max_concurrent", max_concurrent)):
        if v is not _UNSET:
            values[col] = v
    if models is not _UNSET:
        values["allowed_models"] = _models(models)
    if values:
        with engine.begin() as conn:
            conn.execute(api_keys.update().where(api_keys.c.id == row.id).values(**values))
    return row.id


def set_budget(engine: sa.Engine, ref: str, period: str, unit: str, amount: Optional[int]) -> int:
    """A budget of `amount` tokens or micro-units per period; None removes it."""
    if period not in PERIODS or unit not in UNITS:
        raise ValueError(f"period must be one of {PERIODS} and unit one of {UNITS}")
    if amount is not None and amount < 0:
        raise ValueError("a budget cannot be negative")
    row = find_key(engine, ref)
    with engine.begin() as conn:
        where = (budgets.c.key_id == row.id, budgets.c.period == period, budgets.c.unit == unit)
        conn.execute(budgets.delete().where(*where))
        if amount is not None:
            conn.execute(budgets.insert().values(key_id=row.id, period=period, unit=unit, amount=amount))
    return row.id


def set_price(engine: sa.Engine, model: str, prompt_micros_per_mtok: int, completion_micros_per_mtok: int) -> None:
    """Prices per million tokens in micro-units; model '*' is the price of models without one."""
    if prompt_micros_per_mtok < 0 or completion_micros_per_mtok < 0:
        raise ValueError("prices cannot be negative")
    with engine.begin() as conn:
        conn.execute(prices.delete().where(prices.c.model == model))
        conn.execute(prices.insert().values(model=model, prompt_micros_per_mtok=prompt_micros_per_mtok,
                                            completion_micros_per_mtok=completion_micros_per_mtok))


def remove_price(engine: sa.Engine, model: str) -> None:
    with engine.begin() as conn:
        conn.execute(prices.delete().where(prices.c.model == model))


def list_prices(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(prices).order_by(prices.c.model))]


def usage(engine: sa.Engine, by: str = "key", since_ms: Optional[int] = None, until_ms: Optional[int] = None,
          key_ref: Optional[str] = None) -> list[dict[str, Any]]:
    """Ledger totals grouped by key, day (UTC) or model."""
    day = _day_expr(engine)
    group = {"key": [ledger.c.key_label], "day": [day], "model": [ledger.c.model],
             "key-day": [ledger.c.key_label, day], "key-model": [ledger.c.key_label, ledger.c.model]}.get(by)
    if group is None:
        raise ValueError("group by key, day, model, key-day or key-model")
    q = sa.select(*group, sa.func.count().label("requests"),
                  sa.func.sum(ledger.c.prompt_tokens).label("prompt_tokens"),
                  sa.func.sum(ledger.c.completion_tokens).label("completion_tokens"),
                  sa.func.sum(ledger.c.cost_micros).label("cost_micros")).group_by(*group).order_by(*group)
    if since_ms is not None:
        q = q.where(ledger.c.ended_ms >= since_ms)
    if until_ms is not None:
        q = q.where(ledger.c.ended_ms < until_ms)
    if key_ref is not None:
        q = q.where(ledger.c.key_id == find_key(engine, key_ref).id)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return [{k: (int(v) if isinstance(v, (int, float)) or hasattr(v, "as_integer_ratio") else v)
             for k, v in r._mapping.items()} for r in rows]


def _day_expr(engine: sa.Engine):
    if engine.dialect.name == "postgresql":
        return sa.func.to_char(sa.func.to_timestamp(ledger.c.ended_ms / 1000.0).op("AT TIME ZONE")("UTC"),
                               "YYYY-MM-DD").label("day")
    return sa.func.strftime("%Y-%m-%d", ledger.c.ended_ms / 1000.0, "unixepoch").label("day")


def budget_state(engine: sa.Engine, key_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(budget_usage).where(budget_usage.c.key_id == key_id))]


def open_reservations(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(reservations))]
