"""docs/reliability.md from a suite's result (the JSON beside it keeps every figure)."""
from __future__ import annotations

from typing import Any

from .faults import FAULTS

INTRO = """\
`make reliability` (`python -m reliability`) starts the real stack the way `make serve` does
(`python -m stack.serve` as a subprocess on free ports, so its supervision is what restarts a
dead process), runs each part below under a hard time bound, and records what every client
got. A client's answer counts as acceptable only if it is a whole answer (JSON with a
`finish_reason`, or a stream whose chunks reach a `finish_reason` and end with
`data: [DONE]`), a stream ended by an OpenAI error event and `data: [DONE]`, or an HTTP
error with the OpenAI body (`{"error": {"message", "type", "param", "code"}}`, and
`Retry-After` on 429 and 503). Anything else is counted as what it was: `cut` (a response
that stopped without `[DONE]`), `dropped` (the connection closed before any answer),
`refused` (nothing listened on the port), `hung` (no end within the client's timeout),
`malformed`. The same parts, smaller, run in `make test`
(`tests/reliability/test_reliability_short.py`).
"""


READING = """\
## Reading the figures

- **A process killed can say nothing.** The clients of a SIGKILLed adapter see their streams
  cut (the OpenAI SDK raises a connection error); the requests are settled in the accounts as
  `crash_recovered` when make serve has started the adapter again. While it restarts (back-off
  1 s, then 2 s, ...), nothing listens on the port: `refused`. Behind a load balancer with
  several adapters, those connections go to the others.
- **The drain** (SIGTERM) answers new requests with 503 `shutting_down` (`Retry-After`,
  `Connection: close`) until the streams in flight have ended: the short ones run to their
  end, the long ones get an error event and `[DONE]` a margin before the grace period's end.
  The service answers again once the old process has exited and make serve has started the
  new one.
- **A dead backend process** shows only as silence: its streams stop and Triton tells nobody,
  but it answers a new request for the model "stub is not healthy" about 1 s after it is
  sent (the Python backend waits 1 s for the stub's heartbeat). The adapter sends such a probe
  as soon as an endpoint with open streams has been silent for `ADAPTER_SILENCE_PROBE_S`
  (0.3 s), so the streams end about 1.5 s after the death; then it unloads and loads the
  model (Triton's own model readiness says no from the unload on).
  Triton 2.51 itself aborts now and then when the stub dies (`boost::interprocess::lock_exception`
  in the Python backend); then the clients get what a dead tritonserver gives, and make serve
  starts it again.
- **Times in seconds move with the machine's load** (2 cores, shared): time to first token and
  the times to notice a fault are targets, reported, not failing the run.
- **Memory**: the backend process's resident memory grows as sequences reach further into its
  KV cache, whose pages are mapped only when first used (`llm_backend/decoder.py`; 16 slots x
  2048 tokens for the default model): the fault parts' 1500-token streams reach furthest.
  tritonserver grows by the buffers of the 3.8 MB prompts (hostile part).
"""


def _f(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}{unit}"
    return f"{v}{unit}"


def _answers(d: dict[str, int]) -> str:
    return "<br>".join(f"{n} {label}" for label, n in d.items()) or "none"


def _checks(checks: list[dict]) -> list[str]:
    def mark(c: dict) -> str:
        return ("🎯 " if c["ok"] else "⚠️ missed target: ") if c["target"] else ("✅ " if c["ok"] else "❌ ")
    return [f"- {mark(c)}{c['check']}" + (f" ({c['detail']})" if c["detail"] and (not c["ok"] or c["target"])
                                          else "") for c in checks]


def render(r: dict[str, Any], command: str) -> str:
    p, m = r["profile"], r["machine"]
    guarantees = [c for c in r["checks"] if not c["target"]]
    targets = [c for c in r["checks"] if c["target"]]
    failed = [c for c in guarantees if not c["ok"]]
    load = r.get("machine_load", {})
    busy = [f"{part}: " + ", ".join(f"`{b}`" for b in v["busy"]) for part, v in load.items() if v.get("busy")]
    out = ["# Reliability under load, faults and hostile input", "", INTRO,
           f"**Run** {r['date']}, commit {r['commit']}, `{command}`, {r['seconds'] / 60:.1f} min "
           f"(profile `{p['name']}`).  ",
           f"**Machine** {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}.  ",
           f"**What else ran** load average (1 min) at the start of each part: "
           + ", ".join(f"{k} {v['loadavg_1m']}" for k, v in load.items()) + "."
           + (" Other processes over 15% CPU then (1 s sample): " + "; ".join(busy) + "." if busy else ""),
           "",
           f"**Stack** `{r['stack']['command']}` with its defaults except "
           + ", ".join(f"`{k}={v}`" for k, v in r["stack"]["settings"].items())
           + f" (so a drain fits the suite's time), its accounts database in the suite's work directory; ready "
           f"{r['stack']['ready_after_s']} s after start.",
           "",
           f"**Result** {len(guarantees) - len(failed)} of {len(guarantees)} checks passed"
           + ("." if not failed else "; failed: " + "; ".join(f"{c['part']}: {c['check']} ({c['detail']})"
                                                            for c in failed) + ".")
           + " Targets of issue 14 (figures in seconds, which move with the machine's load; reported, not "
             "failing the run): " + "; ".join(f"{c['part']}: {c['check']}: {c['detail']} "
                                              f"({'met' if c['ok'] else 'missed'})" for c in targets) + ".",
           ""]
    out += [READING]
    parts = r["parts"]
    if "load" in parts and "answers" in parts["load"]:
        out += _load(parts["load"])
    if "cancellation_flood" in parts and "by_mode" in parts["cancellation_flood"]:
        out += _flood(parts["cancellation_flood"])
    out += _faults({f.name: parts[f.name] for f in FAULTS if f.name in parts and "in_flight" in parts[f.name]})
    if "schemathesis" in parts and "statuses" in parts["schemathesis"]:
        out += _fuzz(parts["schemathesis"])
    if "hostile" in parts and "cases" in parts["hostile"]:
        out += _hostile(parts["hostile"])
    out += _memory(r["memory"])
    stop = r["stop"]
    out += ["## Stopping", "",
            f"SIGTERM to `make serve` at the end (its Ctrl-C): exit code {stop.get('exit_code')} after "
            f"{stop.get('seconds')} s, processes left behind: {len(stop.get('left_behind') or [])}.", ""]
    out += ["## Every check", ""]
    for name, part in [*parts.items(), ("stop", stop)]:
        out += [f"**{name}** ({part.get('part_seconds', '-')} s)", ""] + _checks(part.get("checks", [])) + [""]
    return "\n".join(out)


def _load(d: dict) -> list[str]:
    t, lat, l429 = d["ttft_admitted_s"], d["latency_complete_s"], d["latency_429_s"]
    return [f"## {d['clients']} streaming clients", "",
            f"{d['clients']} clients, each streaming a chat completion (`max_tokens` {d['max_tokens']}, temperature "
            f"0.7) and sending the next as soon as its answer ended, for {d['seconds']} s; after a 429 a client "
            "waits `Retry-After` (as the OpenAI SDKs do). Time to first token as the client saw it.", "",
            "| what the clients got | requests |", "|---|---|",
            *[f"| {label} | {n} |" for label, n in d["answers"].items()], "",
            "| seconds | p50 | p90 | p99 |", "|---|---|---|---|",
            f"| time to first token, admitted requests | {_f(t['p50'])} | {_f(t['p90'])} | {_f(t['p99'])} |",
            *([f"| the same, sent after the first {d['ramp_s']:g} s (all clients arrive at once at the start) | "
               f"{_f(ts['p50'])} | {_f(ts['p90'])} | {_f(ts['p99'])} |"]
              if (ts := d.get("ttft_admitted_after_ramp_s")) else []),
            f"| whole answer, admitted requests | {_f(lat['p50'])} | {_f(lat['p90'])} | {_f(lat['p99'])} |",
            f"| answer of a 429 | {_f(l429['p50'])} | {_f(l429['p90'])} | {_f(l429['p99'])} |", "",
            f"{d['content_chunks_per_s']} content chunks a second in all; `Retry-After` of the 429s: "
            + ", ".join(f"{n} x {s} s" for s, n in d["retry_after_s"].items())
            + f". Once the clients stopped, nothing ran any more after {_f(d['idle_after_s'], ' s')} "
              "(the adapter's in-flight and waiting gauges, the model's running and waiting gauges, all 0).", "",
            "| process | RSS before, MiB | RSS after, MiB |", "|---|---|---|",
            *[f"| {role} | {v['rss_mib']} | {d['memory_after'].get(role, {}).get('rss_mib', '-')} |"
              for role, v in d["memory_before"].items()], ""]


def _flood(d: dict) -> list[str]:
    return ["## Cancellation flood", "",
            f"{d['streams']} long streams (`ignore_eos`, 512 tokens), {d['concurrency']} open at a time, each left "
            f"by its client, in {d['seconds']} s:", "",
            "| the client left | what it had got |", "|---|---|",
            *[f"| {mode} | {_answers(v)} |" for mode, v in d["by_mode"].items()], "",
            f"Then: everything idle after {_f(d['idle_after_s'], ' s')} (adapter and model gauges 0), "
            f"{d['ledger_cancelled']} requests settled as `cancelled` in the ledger, {d['open_reservations']} "
            f"reservations open, the next request: {d['next_request']}.", ""]


def _faults(faults: dict[str, dict]) -> list[str]:
    if not faults:
        return []
    out = ["## Faults under load", "",
           "Each fault: streaming clients (odd ones long streams that cannot end within the drain's grace "
           "period, even ones short), a one-token probe every 0.25 s, the fault once the streams run; the "
           "clients go on (short streams only) until the probe is answered again and a few seconds more. "
           "Times are from the fault.", "",
           "| fault | streams in flight at the fault got | requests sent after it got | first refusal | "
           "in-flight streams ended | served again | ready again |", "|---|---|---|---|---|---|---|"]
    for name, d in faults.items():
        out.append(f"| {d['fault']} ({d['clients']} clients) | {_answers(d['in_flight'])} | {_answers(d['after'])} | "
                   f"{_f(d['first_refusal_s'], ' s')} | {_f(d['in_flight_ended_s'], ' s')} | "
                   f"{_f(d['served_again_s'], ' s')} | {_f(d['ready_again_s'], ' s')} |")
    out.append("")
    for name, d in faults.items():
        extra = []
        if d.get("restarted_by_make_serve"):
            extra.append("make serve restarted " + ("tritonserver, which aborted when the stub died"
                                                    if name == "backend_killed" else "it"))
        if d.get("triton_not_ready_s") is not None:
            extra.append(f"Triton's own readiness of the model (`/v2/models/NAME/ready`) said no "
                         f"{d['triton_not_ready_s']} s after the kill")
        if d.get("exit_s") is not None:
            extra.append(f"the adapter exited {d['exit_s']} s after the signal")
        if d.get("crash_recovered"):
            extra.append(f"{d['crash_recovered']} requests of the dead adapter settled as `crash_recovered`")
        extra.append(f"idle again {_f(d['idle_after_s'], ' s')} after the clients stopped, "
                     f"{d['open_reservations']} reservations open")
        out.append(f"- {name}: " + "; ".join(extra) + ".")
    out.append("")
    return out


def _fuzz(d: dict) -> list[str]:
    ops = d["by_operation"]
    statuses = sorted({s for v in ops.values() for s in v})
    return ["## Schemathesis over /openapi.json", "",
            f"`{d['command']}` (hooks: `reliability/schemathesis_hooks.py`): {d['test_cases']} test cases, "
            f"{d['requests']} requests in {d['seconds']} s; failures: "
            + (", ".join(f"{f.get('code')} {f.get('title')} ({f.get('count')})" for f in d["failures"]) or "none")
            + "; errors: " + (str(len(d["errors"])) if d["errors"] else "none") + ".", "",
            "| operation | " + " | ".join(statuses) + " |", "|---|" + "---|" * len(statuses),
            *[f"| {op} | " + " | ".join(str(v.get(s, "")) for s in statuses) + " |" for op, v in ops.items()], ""]


def _hostile(d: dict) -> list[str]:
    g = d["giant_prompts"]
    rows = []
    for c in d["cases"]:
        nxt = c.get("next_on_connection", "")
        rows.append(f"| {c['case']} | {c['expected']} | {_f(c.get('status'))} | {c.get('code') or ''} | "
                    f"{c.get('param') or ''} | {'' if nxt == '' else _f(nxt)} |")
    return ["## Hand-written hostile requests", "",
            "Raw bytes over a socket each; where the connection should stay open, a normal request follows on it.",
            "", "| request | must get | got | code | param | next request on the connection |",
            "|---|---|---|---|---|---|", *rows, "",
            f"{g['giant_prompts']} prompts of 3.8 MB at once beside a running stream: {_answers(g['answers'])}, all "
            f"answered within {g['all_refused_within_s']} s; the stream's pause between chunks: median "
            f"{_f(g['stream_median_gap_s'], ' s')}, longest {_f(g['stream_longest_gap_s'], ' s')}.", ""]


def _memory(mem: dict[str, dict]) -> list[str]:
    snaps = list(mem)
    roles = sorted({role for s in mem.values() for role in s}, key=lambda r: (r.startswith("stub"), r))
    out = ["## Memory of every process", "",
           "Resident set size in MiB at the start and after each part; a process that was replaced by a fault "
           "shows its new pid.", "",
           "| process | " + " | ".join(snaps) + " |", "|---|" + "---|" * len(snaps)]
    for role in roles:
        cells, last_pid = [], None
        for s in snaps:
            v = mem[s].get(role)
            if v is None:
                cells.append("-")
                continue
            cells.append(f"{v['rss_mib']}" + (f" (pid {v['pid']})" if last_pid not in (None, v["pid"]) else ""))
            last_pid = v["pid"]
        out.append(f"| {role} | " + " | ".join(cells) + " |")
    return out + [""]
