"""Load parts: many streaming clients at once, and a flood of streams their clients cancel."""
from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx

from .client import Clients, Outcome, chat_body, count, percentile, send
from .profile import Profile, check
from .stack import ServeStack

PROMPTS = [
    "Explain what a hash table is.", "Write a haiku about the sea.", "What is the capital of France?",
    "Give three tips for learning a language.", "Describe a sunset in two sentences.",
    "Why is the sky blue?", "List five fruits.", "What does a compiler do?",
]


RAMP_S = 10.0


def _pct(values: list[float]) -> dict[str, Any]:
    return {f"p{q}": None if percentile(values, q) is None else round(percentile(values, q), 3) for q in (50, 90, 99)}


async def warm_up(stack: ServeStack, max_tokens: int, n: int = 16) -> None:
    """A wave of the load's own requests, so admission's estimate of how long a request
    holds its slot comes from requests like the load's."""
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(send(http, stack.url, stack.model, chat_body(PROMPTS[i % len(PROMPTS)], max_tokens),
                                    timeout=120) for i in range(n)))


async def many_streams(stack: ServeStack, p: Profile) -> dict[str, Any]:
    """`p.load_clients` clients stream chat completions for `p.load_s` seconds, each
    sending again as soon as its answer ended (and waiting Retry-After after a 429)."""
    await warm_up(stack, p.load_max_tokens)
    memory_before = stack.memory()

    def body(i: int, n: int) -> tuple[dict, str]:
        return chat_body(PROMPTS[(i + n) % len(PROMPTS)], p.load_max_tokens, temperature=0.7, seed=i * 1000 + n), "load"

    clients = Clients(stack.url, stack.model, body, timeout=p.request_timeout_s)
    t = time.monotonic()
    outcomes = await clients.run(p.load_clients, lambda: asyncio.sleep(p.load_s), drain_timeout=p.request_timeout_s)
    wall = time.monotonic() - t
    idle_s, gauges = await asyncio.to_thread(stack.wait_idle, 10)
    done = [o for o in outcomes if o.kind == "complete"]
    refused = [o for o in outcomes if o.status == 429]
    tokens = sum(o.chunks for o in outcomes)
    ttft = _pct([o.ttft for o in done if o.ttft is not None])
    # Without the first RAMP_S, when all the clients arrive at once (the burst's tail).
    ttft_steady = _pct([o.ttft for o in done if o.ttft is not None and o.started - t >= RAMP_S])
    unanswered = [o.label() for o in outcomes if not (o.kind == "complete" or o.status == 429 and o.ok)]
    checks = [
        check("every client got a whole answer or a 429 over_capacity with Retry-After", not unanswered,
              count(unanswered) or ""),
        check("some requests were admitted and completed", bool(done), len(done)),
        check("nothing left running once the clients stopped (gauges 0)", idle_s is not None, gauges),
    ]
    if p.ttft_p99_target_s is not None:
        checks.append(check(f"TTFT p99 of admitted requests under {p.ttft_p99_target_s:g} s",
                            ttft["p99"] is not None and ttft["p99"] < p.ttft_p99_target_s, f"{ttft['p99']} s",
                            target=True))
    return {
        "clients": p.load_clients, "seconds": round(wall, 1), "max_tokens": p.load_max_tokens,
        "requests": len(outcomes), "answers": count(o.label() for o in outcomes),
        "ttft_admitted_s": ttft, "ttft_admitted_after_ramp_s": ttft_steady, "ramp_s": RAMP_S,
        "latency_complete_s": _pct([o.ended - o.started for o in done]),
        "latency_429_s": _pct([o.ended - o.started for o in refused]),
        "retry_after_s": count(str(int(o.retry_after)) for o in refused if o.retry_after is not None),
        "content_chunks_per_s": round(tokens / wall, 1),
        "idle_after_s": None if idle_s is None else round(idle_s, 2), "gauges_after": gauges,
        "memory_before": memory_before, "memory_after": stack.memory(),
        "not_ok": [o.as_dict(t) for o in outcomes if not o.ok][:50],
        # every request: [sent at (s from the start), what it got, time to first token]
        "requests_log": [[round(o.started - t, 3), o.label(), None if o.ttft is None else round(o.ttft, 3)]
                         for o in outcomes],
        "checks": checks,
    }


async def cancellation_flood(stack: ServeStack, p: Profile) -> dict[str, Any]:
    """`p.flood_streams` long streams (`ignore_eos`), `p.flood_concurrency` at a time, each
    left by its client: before the answer starts, at the first token, or mid-stream.
    Then nothing may be left running: the adapter's and the model's gauges read 0, no
    reservation is open, and a new request is answered."""
    rng = random.Random(14)
    ledger_before = stack.ledger().get("outcomes", {})
    sem = asyncio.Semaphore(p.flood_concurrency)
    modes = ["before the answer", "at the first token", "mid-stream"]

    async def one(i: int, http: httpx.AsyncClient) -> tuple[str, Outcome]:
        mode = modes[i % 3]
        body = chat_body(PROMPTS[i % len(PROMPTS)], 512, ignore_eos=True)
        async with sem:
            if mode == "before the answer":
                task = asyncio.ensure_future(send(http, stack.url, stack.model, body, timeout=60, tag=mode))
                await asyncio.sleep(rng.uniform(0.0, 0.15))
                if not task.done():
                    task.cancel()  # closes the connection before any response
                    await asyncio.gather(task, return_exceptions=True)
                    now = time.monotonic()
                    return mode, Outcome("cancelled", now, now, tag=mode)
                return mode, task.result()
            leave = 1 if mode == "at the first token" else rng.randint(3, 20)
            return mode, await send(http, stack.url, stack.model, body, timeout=60, tag=mode, leave_after_chunks=leave)

    t = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=p.flood_concurrency * 2)) as http:
        results = await asyncio.gather(*(one(i, http) for i in range(p.flood_streams)))
    wall = time.monotonic() - t
    idle_s, gauges = await asyncio.to_thread(stack.wait_idle, p.settle_timeout_s)
    # The ledger is written when each request settles, just after the cancel reaches it.
    for _ in range(20):
        ledger = stack.ledger()
        if ledger.get("open_reservations") == 0:
            break
        await asyncio.sleep(0.25)
    after = ledger.get("outcomes", {})
    async with httpx.AsyncClient(timeout=60) as http:
        check_out = await send(http, stack.url, stack.model, chat_body("Say hello.", 8), timeout=60, tag="after")
    by_mode = {m: count(o.label() for mode, o in results if mode == m) for m in modes}
    odd = [o.label() for _, o in results if not (o.kind in ("cancelled", "complete") or o.ok and o.status == 429)]
    checks = [
        check("every stream was left by its client, completed, or got a 429 with Retry-After", not odd, count(odd) or ""),
        check("nothing left running (adapter and model gauges 0)", idle_s is not None, gauges),
        check("no reservation left open", ledger.get("open_reservations") == 0, ledger.get("open_reservations")),
        check("the next request is answered", check_out.kind == "complete", check_out.label()),
    ]
    return {
        "streams": p.flood_streams, "concurrency": p.flood_concurrency, "seconds": round(wall, 1),
        "by_mode": by_mode,
        "idle_after_s": None if idle_s is None else round(idle_s, 2), "gauges_after": gauges,
        "ledger_cancelled": after.get("cancelled", 0) - ledger_before.get("cancelled", 0),
        "open_reservations": ledger.get("open_reservations"),
        "next_request": check_out.label(),
        "checks": checks,
    }
