"""The accounts tables (SQLAlchemy Core). Alembic migrations (migrations/) create them;
this module is what the code queries. Money is an integer number of micro-units (1e-6
of the currency) everywhere, times are integer milliseconds since the epoch (UTC)."""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the whole key
    sa.Column("key_hint", sa.String(32), nullable=False),  # "sk-llm-AbCd…wxyz", to recognise it in lists
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("owner", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_ms", sa.BigInteger),
    sa.Column("revoked_ms", sa.BigInteger),
    sa.Column("allowed_models", sa.Text),  # comma-separated names; NULL: every model
    sa.Column("rpm_limit", sa.BigInteger),  # requests per minute; NULL: no limit
    sa.Column("tpm_limit", sa.BigInteger),  # tokens per minute (prompt + max output at admission)
    sa.Column("max_concurrent", sa.Integer),
)

# One row per (key, period, unit): a budget of `amount` tokens or micro-units per day,
# per month (UTC) or in total.
budgets = sa.Table(
    "budgets", metadata,
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("period", sa.String(8), primary_key=True),  # day | month | total
    sa.Column("unit", sa.String(8), primary_key=True),  # tokens | micros
    sa.Column("amount", sa.BigInteger, nullable=False),
)

# What each budget has used in one span of its period ("2026-11-30", "2026-11", "total").
budget_usage = sa.Table(
    "budget_usage", metadata,
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("period", sa.String(8), primary_key=True),
    sa.Column("unit", sa.String(8), primary_key=True),
    sa.Column("span", sa.String(10), primary_key=True),
    sa.Column("committed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved", sa.BigInteger, nullable=False, server_default="0"),
)

# Token buckets of the per-minute limits, shared by every replica: level in
# thousandths of a request or token, refilled at limit/60 per second up to the limit.
rate_buckets = sa.Table(
    "rate_buckets", metadata,
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("kind", sa.String(8), primary_key=True),  # requests | tokens
    sa.Column("level_milli", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)

# A request admitted and not yet settled. Its amounts are held against the budgets,
# the token bucket and the key's concurrency until it ends.
reservations = sa.Table(
    "reservations", metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("instance_id", sa.String(36), nullable=False, index=True),
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id", ondelete="SET NULL"), index=True),
    sa.Column("key_label", sa.String(200), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),  # prompt + output bound
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),  # of which prompt (bound)
    sa.Column("micros", sa.BigInteger, nullable=False),  # cost bound
    # Prices at admission: the request is charged what it was admitted at.
    sa.Column("prompt_price", sa.BigInteger, nullable=False),
    sa.Column("completion_price", sa.BigInteger, nullable=False),
    sa.Column("windows", sa.Text, nullable=False),  # JSON: [[period, unit, span], ...] reserved against
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

# One row per admitted request, written in the transaction that settles it.
ledger = sa.Table(
    "ledger", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, unique=True),
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id", ondelete="SET NULL"), index=True),
    sa.Column("key_label", sa.String(200), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False, server_default=""),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("outcome", sa.String(24), nullable=False),
    sa.Column("ttft_ms", sa.Integer),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("cost_micros", sa.BigInteger, nullable=False),
    sa.Column("started_ms", sa.BigInteger, nullable=False),
    sa.Column("ended_ms", sa.BigInteger, nullable=False, index=True),
)

# Price per million tokens, in micro-units, per model.
prices = sa.Table(
    "prices", metadata,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("prompt_micros_per_mtok", sa.BigInteger, nullable=False),
    sa.Column("completion_micros_per_mtok", sa.BigInteger, nullable=False),
)

# Live adapter processes: a reservation whose instance stopped beating is recovered.
instances = sa.Table(
    "instances", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_ms", sa.BigInteger, nullable=False),
    sa.Column("heartbeat_ms", sa.BigInteger, nullable=False),
)

# Which version of a model takes traffic (written by llm-deploy, read by every adapter
# replica about once a second). No row: the newest ready version.
model_routes = sa.Table(
    "model_routes", metadata,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("serving_version", sa.Integer, nullable=False),
    sa.Column("serving_since_ms", sa.BigInteger, nullable=False),
    sa.Column("previous_version", sa.Integer),  # still loaded: `rollback` goes back to it at once
    sa.Column("canary_version", sa.Integer),
    sa.Column("canary_percent", sa.Integer, nullable=False, server_default="0"),
    sa.Column("canary_since_ms", sa.BigInteger),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)
