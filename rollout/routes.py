"""The route of each model in the shared database (the adapter's ADAPTER_DATABASE_URL):
which version takes traffic, since when, the previous one and a canary. The adapters
read it (openai_adapter/routing.py); only llm-deploy writes it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import sqlalchemy as sa

from openai_adapter.accounts.limits import now_ms
from openai_adapter.accounts.schema import ledger, model_routes


@dataclass
class RouteRow:
    model: str
    serving: int
    serving_since_ms: int
    previous: Optional[int] = None
    canary: Optional[int] = None
    canary_percent: int = 0
    canary_since_ms: Optional[int] = None


def get(engine: sa.Engine, model: str) -> Optional[RouteRow]:
    with engine.connect() as conn:
        r = conn.execute(sa.select(model_routes).where(model_routes.c.model == model)).first()
    if r is None:
        return None
    return RouteRow(r.model, r.serving_version, r.serving_since_ms, r.previous_version, r.canary_version,
                    r.canary_percent, r.canary_since_ms)


def put(engine: sa.Engine, row: RouteRow) -> None:
    values = dict(serving_version=row.serving, serving_since_ms=row.serving_since_ms,
                  previous_version=row.previous, canary_version=row.canary, canary_percent=row.canary_percent,
                  canary_since_ms=row.canary_since_ms, updated_ms=now_ms())
    with engine.begin() as conn:
        done = conn.execute(model_routes.update().where(model_routes.c.model == row.model).values(**values)).rowcount
        if not done:
            conn.execute(model_routes.insert().values(model=row.model, **values))


def version_stats(engine: sa.Engine, model: str, since_ms: int) -> dict[str, dict[str, Any]]:
    """Per version, from the ledger since `since_ms`: requests, failure rate, time to first
    token (median) and duration (median): what a canary is judged by."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(ledger.c.model_version, ledger.c.outcome, ledger.c.ttft_ms,
                                      ledger.c.duration_ms)
                            .where(ledger.c.model == model, ledger.c.started_ms >= since_ms)).all()
    out: dict[str, dict[str, Any]] = {}
    for version in sorted({r.model_version for r in rows}):
        mine = [r for r in rows if r.model_version == version]
        ttfts = sorted(r.ttft_ms for r in mine if r.ttft_ms is not None)
        durations = sorted(r.duration_ms for r in mine)
        failed = sum(r.outcome in ("failed", "crash_recovered") for r in mine)
        out[version or "?"] = {"requests": len(mine), "failed": failed,
                               "error_rate": round(failed / len(mine), 4) if mine else 0.0,
                               "ttft_ms_p50": ttfts[len(ttfts) // 2] if ttfts else None,
                               "duration_ms_p50": durations[len(durations) // 2] if durations else None}
    return out
