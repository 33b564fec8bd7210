"""`make bench`'s ratios measured by another load generator: perf_analyzer.

    python -m bench.cross_check [--concurrency 1 16] [--window-ms 10000]

Issue 13 is checked by running llama-server against the stack side by side with a load
generator other than ours. This does that with Triton's own perf_analyzer, in its OpenAI
mode (`--service-kind openai`, `/v1/completions`, streaming in the payload, `ignore_eos`,
64 output tokens, greedy), at each concurrency against our stack (tritonserver and the
adapter, as `make serve` runs them) and then against llama-server sized as bench.serving
sizes it (`-t 2 -np C`). perf_analyzer keeps C requests in flight and measures in
windows until three agree within `--stability` percent: a steady state with clients
cycling. Each request makes exactly 64 tokens, so requests/s x 64 is tokens/s.

Every request carries `Connection: close`, for both servers alike: over kept-alive
connections llama-server answered some of perf_analyzer's requests with HTTP 400 (not
every run; the first request always succeeded), and perf_analyzer stops at the first
error. Distinct prompts per system (38 tokens, bench.serving's), more than a run sends,
so no prompt cache serves one from another.

Writes docs/bench-results/cross-check-<time>.json and .md. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import write_run
from bench.serving import MODEL, OUT, ROOT, adapter_over, prompts_for, triton_serving

OUTPUT_LEN = 64
PROMPT_LEN = 38


def parse(text: str) -> dict:
    """perf_analyzer's report of one concurrency -> requests/s and latency percentiles
    (ms); {"error": ...} when it did not measure."""
    rate = re.findall(r"Throughput: ([\d.]+) infer/sec", text)
    if not rate:
        reason = [line.strip() for line in text.splitlines()
                  if "error" in line.lower() or "failed" in line.lower()]
        return {"error": " / ".join(reason)[:300] if reason else text.strip()[-200:]}
    out = {"requests_per_s": float(rate[-1])}
    for p in ("50", "90", "99"):
        found = re.findall(rf"p{p} latency: (\d+) usec", text)
        if found:
            out[f"latency_p{p}_ms"] = round(int(found[-1]) / 1000, 1)
    return out


def perf_analyzer(url: str, c: int, prompts: list[str], window_ms: int, stability: int, path: Path) -> dict:
    """One concurrency against the OpenAI API at `url`, its input data written to `path`."""
    data = {"data": [{"payload": [{"model": MODEL, "prompt": p, "max_tokens": OUTPUT_LEN, "ignore_eos": True,
                                   "temperature": 0, "stream": True}]} for p in prompts]}
    path.write_text(json.dumps(data))
    cmd = [sys.executable, "-m", "stack.perf_analyzer", "-m", MODEL, "--service-kind", "openai",
           "--endpoint", "v1/completions", "-u", url.removeprefix("http://"), "--async", "-H", "Connection: close",
           "--input-data", str(path), "--concurrency-range", str(c), "--measurement-interval", str(window_ms),
           "--stability-percentage", str(stability), "--max-trials", "10"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    row = parse(run.stdout + run.stderr)
    if "requests_per_s" in row:
        row["tok_s"] = round(row["requests_per_s"] * OUTPUT_LEN, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--window-ms", type=int, default=10000, help="perf_analyzer's measurement window")
    ap.add_argument("--stability", type=int, default=25, help="percent within which three windows must agree")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from bench.llama_server import BINARY, LlamaServer
    from llm_backend.service import load_tokenizer
    from stack.default_model import ensure_default_model

    if not BINARY.exists():
        print(f"{BINARY} not built: python -m bench.llama_server build", file=sys.stderr)
        return 2
    repo = ROOT / "model_repository"
    tok = load_tokenizer(ensure_default_model(repo, name=MODEL) / "1")
    per_system = 1500       # more than a run sends at 16 streams (10 s windows, up to 10 of them)
    texts, _ = prompts_for(tok, 2 * per_system * len(args.concurrency), PROMPT_LEN)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cross-check-"))
    rows = []
    for i, c in enumerate(args.concurrency):
        ours_prompts = texts[2 * i * per_system:(2 * i + 1) * per_system]
        llama_prompts = texts[(2 * i + 1) * per_system:(2 * i + 2) * per_system]
        with triton_serving(repo, tmp / f"stack-{c}") as triton, adapter_over(triton, tmp / f"stack-{c}") as adapter:
            ours = perf_analyzer(adapter.url, c, ours_prompts, args.window_ms, args.stability,
                                 tmp / f"input-ours-{c}.json")
        server = LlamaServer.for_clients(c, PROMPT_LEN + 2 * OUTPUT_LEN, tmp / f"llama-server-{c}.log")
        try:
            llama = perf_analyzer(server.url, c, llama_prompts, args.window_ms, args.stability,
                                  tmp / f"input-llama-{c}.json")
        finally:
            server.stop()
        ratio = (round(ours["requests_per_s"] / llama["requests_per_s"], 3)
                 if "requests_per_s" in ours and "requests_per_s" in llama else None)
        rows.append({"concurrency": c, "ours": ours, "llama_server": llama, "ratio": ratio})
        print(f"c={c}: ours {ours} llama-server {llama} ratio {ratio}", flush=True)

    def cell(r: dict) -> str:
        if "error" in r:
            return f"did not measure: {r['error']}"
        return (f"{r['requests_per_s']} req/s = {r['tok_s']} tok/s, latency p50 / p99 "
                f"{r.get('latency_p50_ms')} / {r.get('latency_p99_ms')} ms")

    lines = ["| concurrency | ours, OpenAI API | llama-server (C++) | ours / llama-server |", "|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {cell(r['ours'])} | {cell(r['llama_server'])} | "
              f"{'-' if r['ratio'] is None else str(r['ratio']) + 'x'} |" for r in rows]
    table = (f"# bench.cross_check {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
             f"perf_analyzer --service-kind openai, /v1/completions, {PROMPT_LEN}-token prompts (each its own), "
             f"{OUTPUT_LEN} output tokens with ignore_eos, greedy, streaming, `Connection: close`; "
             f"{args.window_ms} ms windows, {args.stability}% stability; our stack, then llama-server "
             "(`-t 2 -np C`), at each concurrency.\n\n" + "\n".join(lines) + "\n")
    print("\n" + table)
    write_run(OUT, "cross-check", {"rows": rows, "settings": vars(args)}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
