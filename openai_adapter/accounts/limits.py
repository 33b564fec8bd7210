"""The arithmetic of limits and money, free of any database: token buckets, budget
periods, reservation sizes and costs. Integers throughout (no float money)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

MILLI = 1000
MINUTE_MS = 60_000
MICROS = 1_000_000  # micro-units per currency unit
MTOK = 1_000_000  # prices are per million tokens
PERIODS = ("day", "month", "total")
UNITS = ("tokens", "micros")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Bucket:
    """A token bucket holding up to `limit` units, refilled at limit per minute.
    `level_milli` is in thousandths of a unit so slow refills are not lost to rounding."""

    limit: int
    level_milli: int
    updated_ms: int

    @classmethod
    def full(cls, limit: int, at_ms: int) -> "Bucket":
        return cls(limit, limit * MILLI, at_ms)

    def refill(self, at_ms: int) -> None:
        elapsed = max(0, at_ms - self.updated_ms)
        cap = self.limit * MILLI
        self.level_milli = min(cap, self.level_milli + elapsed * self.limit * MILLI // MINUTE_MS)
        self.updated_ms = max(self.updated_ms, at_ms)

    @property
    def remaining(self) -> int:
        return max(0, self.level_milli // MILLI)

    def wait_ms(self, amount: int) -> int:
        """Time until `amount` units are available (0: now)."""
        missing = amount * MILLI - self.level_milli
        if missing <= 0 or self.limit <= 0:
            return 0
        return -(-missing * MINUTE_MS // (self.limit * MILLI))

    def reset_ms(self) -> int:
        """Time until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return self.wait_ms(self.limit)

    def take(self, amount: int) -> None:
        self.level_milli -= amount * MILLI

    def give_back(self, amount: int) -> None:
        self.level_milli = min(self.limit * MILLI, self.level_milli + amount * MILLI)


def spans(at_ms: int) -> dict[str, str]:
    """The budget span of each period that contains `at_ms` (UTC)."""
    t = datetime.fromtimestamp(at_ms / 1000, tz=timezone.utc)
    return {"day": t.strftime("%Y-%m-%d"), "month": t.strftime("%Y-%m"), "total": "total"}


def cost_micros(prompt_tokens: int, completion_tokens: int, prompt_price: int, completion_price: int) -> int:
    """Cost in micro-units of a request, prices in micro-units per million tokens,
    rounded up to the next micro-unit (a request never costs less than its tokens)."""
    total = prompt_tokens * prompt_price + completion_tokens * completion_price
    return -(-total // MTOK)


@dataclass
class Reserve:
    """Upper bounds of what a request can use, known before it is tokenized."""

    tokens: int  # prompt + output, for token budgets and the tokens-per-minute bucket
    prompt: int  # bound of the prompt tokens, for its cost
    completion: int  # bound of the completion tokens, for its cost


def reserve_for(prompt_bytes: list[int], max_tokens: list[int | None], max_model_len: int) -> Reserve:
    """Bounds for a request's sequences (one per prompt and choice).

    A prompt never has more tokens than UTF-8 bytes (byte-level BPE: every token covers
    at least one byte; the template's special tokens cover several), and an accepted
    sequence never exceeds the context (the model refuses it otherwise), so the request
    can never use more than this."""
    ctx = max_model_len if max_model_len > 0 else DEFAULT_CONTEXT
    tokens = prompt = completion = 0
    for nbytes, mt in zip(prompt_bytes, max_tokens):
        p = min(nbytes, ctx)
        out = min(mt, ctx) if mt is not None else ctx - p
        tokens += min(p + out, ctx)
        prompt += p
        completion += out
    return Reserve(tokens, prompt, completion)


DEFAULT_CONTEXT = 8192  # when the model does not say its context length


def parse_money(text: str) -> int:
    """'0.15' (currency units) -> 150000 micro-units; exact decimal, no float."""
    from decimal import Decimal, InvalidOperation
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    micros = value * MICROS
    if value < 0 or micros != micros.to_integral_value():
        raise ValueError(f"{text!r} must be non-negative with at most 6 decimals")
    return int(micros)


def format_money(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{frac:06d}"


def format_reset(ms: int) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: '1s', '6m0s', '120ms'."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    seconds = -(-ms // 1000)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
