"""`llm-admin`: keys, limits, budgets, prices, usage and migrations of the accounts
database (the adapter's ADAPTER_DATABASE_URL)."""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from . import manage
from .limits import format_money, now_ms, parse_money
from .store import SchemaOutOfDate, check_schema, make_engine, migrate

DEFAULT_URL = "sqlite:///data/accounts.db"


def _limit(text: str) -> Optional[int]:
    """A limit: a non-negative integer, or 'none' for no limit."""
    if text.lower() in ("none", "off", "unlimited"):
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'none'")
    return int(text)


def _when(text: str) -> Optional[int]:
    """Expiry: 'never', a duration from now (30d, 12h, 90m) or a date/time in UTC (ISO 8601)."""
    if text.lower() in ("never", "none"):
        return None
    m = re.fullmatch(r"(\d+)([dhm])", text)
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        at = datetime.now(timezone.utc) + timedelta(**{unit: int(m.group(1))})
    else:
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration (30d, 12h) or an ISO date") from None
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
    return int(at.timestamp() * 1000)


def _date(text: str) -> int:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date (2026-11-30) or time") from None
    return int((at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp() * 1000)


def _budget(text: str) -> tuple[str, str, int]:
    """PERIOD:AMOUNT with AMOUNT in tokens (1000000) or money ($5, 5.00$, or 5.00 money)."""
    period, _, amount = text.partition(":")
    if period not in ("day", "month", "total") or not amount:
        raise argparse.ArgumentTypeError(f"{text!r}: use day|month|total:TOKENS or day|month|total:$MONEY")
    if amount.startswith("$"):
        try:
            return period, "micros", parse_money(amount[1:])
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    if not amount.isdigit():
        raise argparse.ArgumentTypeError(f"{amount!r} is not a whole number of tokens (write $X.YZ for money)")
    return period, "tokens", int(amount)


def _ms_to_text(ms: Optional[int]) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_rows(rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print("(nothing)" if fmt == "table" else "")
        return
    cols = list(rows[0])
    if fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        return
    text = [[str("" if r[c] is None else r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def _key_rows(engine) -> list[dict[str, Any]]:
    out = []
    for k in manage.list_keys(engine):
        status = "revoked" if k["revoked_ms"] else ("expired" if k["expires_ms"] and k["expires_ms"] <= now_ms() else "active")
        budgets = ", ".join(f"{name.split('_')[0]} {format_money(v) if name.endswith('micros') else v}"
                            f"{'' if name.endswith('micros') else ' tokens'}" for name, v in k["budgets"].items())
        out.append({"id": k["id"], "name": k["name"], "owner": k["owner"], "key": k["key_hint"], "status": status,
                    "expires": _ms_to_text(k["expires_ms"]), "models": k["allowed_models"] or "*",
                    "rpm": k["rpm_limit"], "tpm": k["tpm_limit"], "concurrency": k["max_concurrent"],
                    "budgets": budgets})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-admin", description=__doc__)
    p.add_argument("--database-url", default=os.environ.get("ADAPTER_DATABASE_URL", DEFAULT_URL),
                   help="the adapter's accounts database (env ADAPTER_DATABASE_URL; default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="create or upgrade the accounts tables")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    c = keys.add_parser("create", help="create a key (printed once; only its hash is stored)")
    c.add_argument("name")
    c.add_argument("--owner", default="")
    c.add_argument("--expires", type=_when, default=None, help="30d, 12h, an ISO date, or never")
    c.add_argument("--models", default=None, help="comma-separated model names this key may use (default: all)")
    c.add_argument("--rpm", type=_limit, default=None, help="requests per minute")
    c.add_argument("--tpm", type=_limit, default=None, help="tokens per minute (prompt + max output)")
    c.add_argument("--concurrency", type=_limit, default=None, help="requests running at once")
    c.add_argument("--budget", type=_budget, action="append", default=[],
                   help="day|month|total:TOKENS or day|month|total:$MONEY (repeatable)")
    ls = keys.add_parser("list", help="every key (hints only)")
    ls.add_argument("--format", choices=["table", "csv", "json"], default="table")
    r = keys.add_parser("revoke", help="refuse a key from now on (every replica within 2 s)")
    r.add_argument("key", help="id, name, or the key itself")
    u = keys.add_parser("update", help="change a key's name, owner, expiry, models or limits")
    u.add_argument("key", help="id, name, or the key itself")
    # Only what is given changes (SUPPRESS: absent options are not in the namespace).
    u.add_argument("--name", default=argparse.SUPPRESS)
    u.add_argument("--owner", default=argparse.SUPPRESS)
    u.add_argument("--expires", type=_when, default=argparse.SUPPRESS, help="30d, 12h, an ISO date, or never")
    u.add_argument("--models", default=argparse.SUPPRESS, help="comma-separated, or '*' for all")
    u.add_argument("--rpm", type=_limit, default=argparse.SUPPRESS, help="a number, or none")
    u.add_argument("--tpm", type=_limit, default=argparse.SUPPRESS, help="a number, or none")
    u.add_argument("--concurrency", type=_limit, default=argparse.SUPPRESS, help="a number, or none")

    b = sub.add_parser("budgets", help="a key's budgets").add_subparsers(dest="action", required=True)
    bs = b.add_parser("set", help="set a budget (replaces the one of the same period and unit)")
    bs.add_argument("key")
    bs.add_argument("budget", type=_budget, help="day|month|total:TOKENS or day|month|total:$MONEY")
    br = b.add_parser("remove", help="remove a budget")
    br.add_argument("key")
    br.add_argument("period", choices=["day", "month", "total"])
    br.add_argument("unit", choices=["tokens", "money"])
    bsh = b.add_parser("show", help="a key's budgets and what they have used")
    bsh.add_argument("key")

    pr = sub.add_parser("prices", help="prices per million tokens, per model").add_subparsers(dest="action",
                                                                                          required=True)
    ps = pr.add_parser("set", help="set a model's prices ('*': models without a price of their own)")
    ps.add_argument("model")
    ps.add_argument("--prompt", required=True, help="price of a million prompt tokens, e.g. 0.15")
    ps.add_argument("--completion", required=True, help="price of a million completion tokens, e.g. 0.60")
    pr.add_parser("list", help="every price")
    prm = pr.add_parser("remove", help="remove a model's prices")
    prm.add_argument("model")

    us = sub.add_parser("usage", help="the ledger's totals")
    us.add_argument("--by", choices=["key", "day", "model", "key-day", "key-model"], default="key")
    us.add_argument("--since", type=_date, help="from this ISO date or time (UTC), inclusive")
    us.add_argument("--until", type=_date, help="up to this ISO date or time (UTC), exclusive")
    us.add_argument("--key", help="only this key (id, name or the key)")
    us.add_argument("--format", choices=["table", "csv", "json"], default="table")
    return p


def run(args: argparse.Namespace) -> int:
    engine = make_engine(args.database_url)
    try:
        if args.command == "migrate":
            before, after = migrate(engine)
            print(f"accounts schema: {before or 'empty'} -> {after}")
            return 0
        check_schema(engine)
        if args.command == "keys":
            return _keys(engine, args)
        if args.command == "budgets":
            return _budgets(engine, args)
        if args.command == "prices":
            return _prices(engine, args)
        if args.command == "usage":
            rows = manage.usage(engine, by=args.by, since_ms=args.since, until_ms=args.until, key_ref=args.key)
            for r in rows:
                r["cost"] = format_money(r.pop("cost_micros") or 0)
            _print_rows(rows, args.format)
            return 0
    finally:
        engine.dispose()
    return 2


def _keys(engine, args) -> int:
    if args.action == "create":
        models = args.models.split(",") if args.models else None
        new = manage.create_key(engine, args.name, owner=args.owner, expires_ms=args.expires, models=models,
                                rpm=args.rpm, tpm=args.tpm, max_concurrent=args.concurrency)
        for period, unit, amount in args.budget:
            manage.set_budget(engine, str(new.id), period, unit, amount)
        print(new.key)
        print(f"key {new.id} ({args.name}) created; this is the only time it is shown", file=sys.stderr)
        return 0
    if args.action == "list":
        _print_rows(_key_rows(engine), args.format)
        return 0
    if args.action == "revoke":
        kid = manage.revoke_key(engine, args.key)
        print(f"key {kid} revoked")
        return 0
    if args.action == "update":
        changes: dict[str, Any] = {}
        for opt, name in (("name", "name"), ("owner", "owner"), ("expires", "expires_ms"), ("rpm", "rpm"),
                          ("tpm", "tpm"), ("concurrency", "max_concurrent")):
            if hasattr(args, opt):
                changes[name] = getattr(args, opt)
        if hasattr(args, "models"):
            changes["models"] = None if args.models == "*" else args.models.split(",")
        kid = manage.update_key(engine, args.key, **changes)
        print(f"key {kid} updated: {', '.join(changes) or 'nothing to change'}")
        return 0
    return 2


def _budgets(engine, args) -> int:
    if args.action == "set":
        period, unit, amount = args.budget
        kid = manage.set_budget(engine, args.key, period, unit, amount)
        print(f"key {kid}: {period} budget of {format_money(amount) if unit == 'micros' else amount} {unit}")
    elif args.action == "remove":
        kid = manage.set_budget(engine, args.key, args.period, "micros" if args.unit == "money" else "tokens", None)
        print(f"key {kid}: {args.period} {args.unit} budget removed")
    else:
        key = manage.find_key(engine, args.key)
        rows = manage.budget_state(engine, key.id)
        _print_rows([{k: v for k, v in r.items() if k != "key_id"} for r in rows], "table")
    return 0


def _prices(engine, args) -> int:
    if args.action == "set":
        manage.set_price(engine, args.model, parse_money(args.prompt), parse_money(args.completion))
        print(f"{args.model}: {args.prompt} per million prompt tokens, {args.completion} per million completion tokens")
    elif args.action == "remove":
        manage.remove_price(engine, args.model)
    else:
        _print_rows([{"model": r["model"], "prompt_per_mtok": format_money(r["prompt_micros_per_mtok"]),
                      "completion_per_mtok": format_money(r["completion_micros_per_mtok"])}
                     for r in manage.list_prices(engine)], "table")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SchemaOutOfDate, manage.NotFound, ValueError) as err:
        print(f"llm-admin: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
