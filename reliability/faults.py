"""Faults under load: a process of the stack dies (or is told to stop) while streams run.

Each fault runs the same way: `p.fault_clients` clients stream (odd ones long streams
that cannot end within the drain's grace period, even ones short), a probe sends a
one-token request every 0.25 s, and once the streams are under way the fault is injected.
The clients keep going (short streams only from then on) until the probe is answered
again after its last failure, a few seconds more, and stop. What every client got is
counted by phase: streams in flight at the fault, and requests sent after it.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from openai_adapter.drain import margin_s

from .client import Clients, Outcome, Probe, chat_body, count
from .load import PROMPTS
from .profile import Profile, check
from .stack import ServeStack

AFTER_S = 3.0  # load kept on the healed service before the clients stop


@dataclass(frozen=True)
class Fault:
    """`in_flight_ok`: what a request sent before the fault and still running may get (a
    stream gets an error event; one still waiting for its first token, an HTTP error)."""

    name: str
    what: str                     # the table's description
    role: str                     # the process it hits
    sig: str                      # "kill" (SIGKILL) or "terminate" (SIGTERM)
    in_flight_ok: frozenset[str]  # labels acceptable for streams in flight at the fault
    after_ok: frozenset[str]      # label prefixes acceptable for requests sent after it


def _fits(label: str, allowed: frozenset[str]) -> bool:
    return any(label == a or label.startswith(a + " ") for a in allowed)


FAULTS = [
    # In flight: `model_restarting`, or, when tritonserver itself aborts on the stub's death
    # (Triton 2.51's Python backend, now and then: boost lock_exception), what its death gives.
    Fault("backend_killed", "the model's backend process (Triton's Python stub) gets SIGKILL", "stub", "kill",
          frozenset({"complete", "error_event", "http_error 503"}),
          frozenset({"complete", "http_error 503", "http_error 429 over_capacity"})),
    Fault("tritonserver_killed", "tritonserver gets SIGKILL; make serve starts it again", "tritonserver", "kill",
          frozenset({"complete", "error_event", "http_error 503"}),
          frozenset({"complete", "http_error 503", "http_error 429 over_capacity"})),
    Fault("adapter_killed", "the adapter gets SIGKILL; make serve starts it again", "adapter", "kill",
          # A killed process sends nothing more: its clients see the connection end (or had
          # their whole answer just before).
          frozenset({"cut", "dropped", "complete", "http_error"}),
          frozenset({"complete", "refused", "dropped", "http_error 503", "http_error 429 over_capacity"})),
    Fault("adapter_sigterm", "the adapter gets SIGTERM (drain); make serve starts it again", "adapter", "terminate",
          frozenset({"complete", "error_event 200 shutting_down", "http_error 503 shutting_down"}),
          frozenset({"complete", "refused", "http_error 503 shutting_down", "http_error 503",
                     "http_error 429 over_capacity"})),
]


async def run_fault(stack: ServeStack, p: Profile, fault: Fault) -> dict[str, Any]:
    phase = {"long": True}

    def body(i: int, n: int) -> tuple[dict, str]:
        long = phase["long"] and i % 2 == 1
        tokens = p.fault_long_tokens if long else p.fault_short_tokens
        return chat_body(PROMPTS[(i + n) % len(PROMPTS)], tokens, ignore_eos=True, temperature=0.7), \
            ("long" if long else "short")

    role = f"stub {stack.model}" if fault.role == "stub" else fault.role
    victim = stack.process(role)
    restarts_before, ledger_before = stack.restarts(), stack.ledger()
    clients = Clients(stack.url, stack.model, body, timeout=p.request_timeout_s)
    probe = Probe(stack.url, stack.model)
    info: dict[str, Any] = {"victim_pid": victim.pid}
    marks: dict[str, float] = {}

    async def scenario() -> None:
        # Under way: the adapter runs the clients' streams and they have started to produce.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            g = await asyncio.to_thread(stack.gauges)
            if (g.get("adapter_requests_in_flight") or 0) >= max(1, int(p.fault_clients * 0.75)):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        probe.start()
        await asyncio.sleep(0.5)
        marks["fault"] = time.monotonic()
        if fault.sig == "kill":
            victim.kill()
        else:
            victim.terminate()
        if fault.role == "adapter" and fault.sig == "terminate":
            info["exit_s"] = round(await asyncio.to_thread(_wait_exit, victim, p.grace_s + 30) - marks["fault"], 2)
        phase["long"] = False
        watch_triton = asyncio.ensure_future(_triton_not_ready(stack, marks)) if fault.role == "stub" else None
        try:
            # Healed: answered again after the last failure, and ready.
            deadline = marks["fault"] + p.recover_timeout_s
            while time.monotonic() < deadline:
                rec = probe.recovery(marks["fault"])
                if rec["served_again_s"] is not None and (rec["probes_failed"] or time.monotonic() - marks["fault"] > 5):
                    if await asyncio.to_thread(stack.ready):
                        marks.setdefault("ready", time.monotonic())
                        break
                await asyncio.sleep(0.25)
        finally:
            if watch_triton is not None:
                watch_triton.cancel()
                await asyncio.gather(watch_triton, return_exceptions=True)
        await asyncio.sleep(AFTER_S)

    outcomes = await clients.run(p.fault_clients, scenario, drain_timeout=p.request_timeout_s)
    await probe.stop()
    fault_at = marks.get("fault", time.monotonic())
    in_flight = [o for o in outcomes if o.started < fault_at < o.ended]
    after = [o for o in outcomes if o.started >= fault_at]
    idle_s, gauges = await asyncio.to_thread(stack.wait_idle, p.settle_timeout_s)
    rec = probe.recovery(fault_at)
    ledger = await asyncio.to_thread(_settled_ledger, stack, p.settle_timeout_s)
    try:
        replaced = stack.process(role, timeout=5).pid != victim.pid
    except RuntimeError:
        replaced = False
    ended_by = max((o.ended - fault_at for o in in_flight), default=None)
    result = {
        "fault": fault.what, "signal": "SIGKILL" if fault.sig == "kill" else "SIGTERM",
        "clients": p.fault_clients, **info,
        "in_flight": count(o.label() + (" (long)" if o.tag == "long" else "") for o in in_flight),
        "after": count(o.label() for o in after),
        "in_flight_ended_s": None if ended_by is None else round(ended_by, 2),
        **rec,
        "ready_again_s": round(marks["ready"] - fault_at, 2) if "ready" in marks else None,
        "triton_not_ready_s": round(marks["triton_not_ready"] - fault_at, 2) if "triton_not_ready" in marks else None,
        "restarted_by_make_serve": stack.restarts() - restarts_before, "process_replaced": replaced,
        "idle_after_s": None if idle_s is None else round(idle_s, 2), "gauges_after": gauges,
        "open_reservations": ledger.get("open_reservations"),
        "crash_recovered": ledger.get("outcomes", {}).get("crash_recovered", 0)
        - ledger_before.get("outcomes", {}).get("crash_recovered", 0),
        "not_ok": [o.as_dict(fault_at) for o in outcomes if not _acceptable(fault, o, fault_at)][:30],
        # every probe: [sent at (s from the fault), what it got, seconds it took]
        "probe_log": [[round(o.started - fault_at, 2), o.label(), round(o.ended - o.started, 2)]
                      for o in probe.outcomes],
    }
    result["checks"] = _checks(fault, p, result, in_flight, after, outcomes, fault_at)
    return result


def _acceptable(fault: Fault, o: Outcome, fault_at: float) -> bool:
    if o.started >= fault_at:
        return _fits(o.label(), fault.after_ok)
    if o.ended > fault_at:
        return _fits(o.label(), fault.in_flight_ok)
    return o.kind == "complete"


def _checks(fault: Fault, p: Profile, r: dict, in_flight: list[Outcome], after: list[Outcome],
            outcomes: list[Outcome], fault_at: float) -> list[dict]:
    wrong_in = [o.label() for o in in_flight if not _fits(o.label(), fault.in_flight_ok)]
    wrong_after = [o.label() for o in after if not _fits(o.label(), fault.after_ok)]
    before = [o.label() for o in outcomes if o.ended <= fault_at and o.kind != "complete"]
    checks = [
        check("streams were in flight at the fault", bool(in_flight), len(in_flight)),
        check(f"streams in flight got: {' / '.join(sorted(fault.in_flight_ok))}", not wrong_in,
              count(wrong_in) or ""),
        check(f"requests sent after the fault got: {' / '.join(sorted(fault.after_ok))}", not wrong_after,
              count(wrong_after) or ""),
        check("requests before the fault completed", not before, count(before) or ""),
        check(f"served again by itself within {p.recover_timeout_s:g} s", r["served_again_s"] is not None,
              f"{r['served_again_s']} s"),
        check("ready again (/health/ready 200)", r["ready_again_s"] is not None, f"{r['ready_again_s']} s"),
        check("nothing left running once the clients stopped (gauges 0)", r["idle_after_s"] is not None,
              r["gauges_after"]),
        check("no reservation left open", r["open_reservations"] == 0, r["open_reservations"]),
    ]
    if fault.name == "backend_killed":
        checks.append(check("in-flight streams ended (error event and [DONE]) within 2 s",
                            r["in_flight_ended_s"] is not None and r["in_flight_ended_s"] <= 2.0,
                            f"{r['in_flight_ended_s']} s", target=True))
        checks.append(check("the model serves again within 30 s",
                            r["served_again_s"] is not None and r["served_again_s"] <= 30, f"{r['served_again_s']} s"))
        checks.append(check("a new backend process", r["process_replaced"]))
        checks.append(check("Triton's own model readiness failed (not ready, or no answer) before the model was back",
                            r["triton_not_ready_s"] is not None, f"{r['triton_not_ready_s']} s"))
    if fault.name == "backend_killed" and r["restarted_by_make_serve"]:
        checks.append(check("tritonserver aborted on the stub's death; make serve started it again",
                            r["process_replaced"], r["restarted_by_make_serve"]))
    if fault.role in ("tritonserver", "adapter"):
        checks.append(check("make serve started it again", r["restarted_by_make_serve"] >= 1 and r["process_replaced"],
                            r["restarted_by_make_serve"]))
    if fault.name == "adapter_killed":
        cut = sum(1 for o in in_flight if o.kind in ("cut", "dropped"))
        checks.append(check("the killed adapter's requests were settled as crash_recovered",
                            r["crash_recovered"] >= 1 and r["open_reservations"] == 0,
                            f"{r['crash_recovered']} settled, {cut} cut"))
    if fault.name == "adapter_sigterm":
        # Streams run on through the grace period; only those still running a margin
        # before its end are ended (openai_adapter/drain.py), none earlier.
        end_from = p.grace_s - margin_s(p.grace_s) - 0.5
        # (A request sent just before the signal and received after it gets 503 at once, rightly.)
        early = [round(o.ended - fault_at, 2) for o in in_flight
                 if o.kind == "error_event" and o.ended - fault_at < end_from]
        checks.append(check(f"no stream in flight was ended before the grace period's end ({end_from:g} s)",
                            not early, early or ""))
        checks.append(check(f"the adapter exited within the grace period ({p.grace_s:g} s) + 2 s",
                            r.get("exit_s") is not None and r["exit_s"] <= p.grace_s + 2, f"{r.get('exit_s')} s"))
    return checks


async def _triton_not_ready(stack: ServeStack, marks: dict[str, float]) -> None:
    """Mark when Triton's own readiness of the model first fails, as a probe in Kubernetes
    sees it: "not ready", or no answer (Triton 2.51 sometimes aborts when the stub dies)."""
    while "triton_not_ready" not in marks:
        if await asyncio.to_thread(stack.triton_model_ready) is not True:
            marks["triton_not_ready"] = time.monotonic()
        await asyncio.sleep(0.1)


def _wait_exit(proc: psutil.Process, timeout: float) -> float:
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        pass
    return time.monotonic()


def _settled_ledger(stack: ServeStack, timeout: float) -> dict:
    """The ledger once no reservation is open (a restarted adapter settles a dead one's at start)."""
    deadline = time.monotonic() + timeout
    while True:
        ledger = stack.ledger()
        if ledger.get("open_reservations") == 0 or time.monotonic() > deadline:
            return ledger
        time.sleep(0.25)


async def run_faults(stack: ServeStack, p: Profile, names: Callable[[str], bool] = lambda n: True) -> dict[str, Any]:
    out = {}
    for fault in FAULTS:
        if names(fault.name):
            out[fault.name] = await run_fault(stack, p, fault)
            await asyncio.to_thread(stack.wait_ready, p.recover_timeout_s)
    return out
