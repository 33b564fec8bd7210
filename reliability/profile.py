"""How big each part is (the full suite, and the short one `make test` runs), and the
checks each part records."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    load_clients: int
    load_s: float
    load_max_tokens: int
    flood_streams: int
    flood_concurrency: int
    fault_clients: int
    fault_short_tokens: int      # streams that end well within the drain's grace period
    fault_long_tokens: int       # streams that cannot (ignore_eos), so the grace period ends them
    grace_s: float               # ADAPTER_SHUTDOWN_GRACE_S of the stack
    body_timeout_s: float        # ADAPTER_BODY_TIMEOUT_S of the stack
    fuzz_examples: int           # schemathesis --max-examples per operation
    fuzz_timeout_s: float
    request_timeout_s: float     # a client gives up (and records "hung") after this
    recover_timeout_s: float     # a fault must be healed within this
    settle_timeout_s: float      # the gauges must read 0 within this once the clients are gone
    ttft_p99_target_s: float | None  # the bound at 64 clients (None: not checked)
    part_budget_s: float         # hard bound of each part

    def stack_env(self) -> dict[str, str]:
        """Settings of the stack that differ from `make serve`'s defaults."""
        env = {"ADAPTER_SHUTDOWN_GRACE_S": f"{self.grace_s:g}"}
        if self.body_timeout_s != 30:
            env["ADAPTER_BODY_TIMEOUT_S"] = f"{self.body_timeout_s:g}"
        return env

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Profile(
    name="full", load_clients=64, load_s=60, load_max_tokens=64, flood_streams=200, flood_concurrency=32,
    fault_clients=16, fault_short_tokens=64, fault_long_tokens=1500, grace_s=10, body_timeout_s=30,
    fuzz_examples=300, fuzz_timeout_s=300, request_timeout_s=120, recover_timeout_s=90, settle_timeout_s=15,
    ttft_p99_target_s=2.0, part_budget_s=300)

SHORT = Profile(
    name="short", load_clients=8, load_s=5, load_max_tokens=16, flood_streams=24, flood_concurrency=8,
    fault_clients=4, fault_short_tokens=24, fault_long_tokens=1500, grace_s=4, body_timeout_s=2,
    fuzz_examples=4, fuzz_timeout_s=90, request_timeout_s=60, recover_timeout_s=60, settle_timeout_s=15,
    ttft_p99_target_s=None, part_budget_s=150)


def check(name: str, ok: bool, detail: Any = "", target: bool = False) -> dict[str, Any]:
    """One check of a part. A `target` is one of the issue's figures measured in seconds
    (time to first token, time to notice a death): reported, met or missed, without failing
    the run, since on a shared machine it moves with the load; every other check is a
    guarantee that must hold on any machine."""
    return {"check": name, "ok": bool(ok), "detail": detail if isinstance(detail, str) else str(detail),
            "target": target}
