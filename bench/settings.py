"""How many onnxruntime threads the engine should run: the whole stack, in turns.

For each setting of the model's `intra_op_threads` (and `ort_allow_spinning`), the
default model is served with that config.pbtxt (a copy of the repository's model whose
version directory is a link to the real one), and the same load as `make bench` goes
through the OpenAI API and directly over gRPC at concurrency 1 and 16: 38-token prompts,
each request its own, 64 greedy output tokens. Settings alternate round by round, so a
drift of the machine hits all of them alike.

    python -m bench.threads [--threads 1 2] [--rounds 2]

Writes docs/bench-results/threads-<time>.json and .md and prints the table. The default
(`intra_op_threads = 0`: every core the process may use) was checked with it: on 2 cores,
5 rounds, one thread and two served the same through the API, two were 3-6% faster over
gRPC (docs/engine.md).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.results import write_run
from bench.serving import (MODEL, OUT, ROOT, adapter_over, grpc_stream, load, openai_stream, prompts_for,
                           summarize, triton_serving)

LEVELS = (1, 16)
REQUESTS = {1: 16, 16: 32}  # per level: 16 one after another, 16 clients x 2


def configured(src: Path, dest: Path, threads: int, spinning: int) -> Path:
    """A repository of one model: `src`'s config with these knobs, its version linked."""
    model = dest / MODEL
    model.mkdir(parents=True)
    os.symlink(src / "1", model / "1")
    cfg = (src / "config.pbtxt").read_text()
    for key, value in (("intra_op_threads", threads), ("ort_allow_spinning", spinning)):
        cfg, n = re.subn(rf'(key: "{key}" value: {{ string_value: ")[^"]*(")', rf"\g<1>{value}\2", cfg)
        if n != 1:
            raise SystemExit(f"{src / 'config.pbtxt'} has no {key} parameter")
    (model / "config.pbtxt").write_text(cfg)
    return dest


def measure(repo: Path, tmp: Path, texts: list[str], ids: list[list[int]], offset: int) -> list[dict]:
    rows = []
    with triton_serving(repo, tmp) as triton, adapter_over(triton, tmp) as adapter:
        async def api(c: int, base: int):
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
                async def send(i: int) -> dict:
                    return await openai_stream(http, adapter.url, MODEL, texts[base + i], 64)
                await openai_stream(http, adapter.url, MODEL, texts[-1], 64)  # warm-up
                return await load(send, c, REQUESTS[c] // c, 0.1)

        async def grpc(c: int, base: int):
            import tritonclient.grpc.aio as grpcclient
            client = grpcclient.InferenceServerClient(triton.grpc_url)
            try:
                async def send(i: int) -> dict:
                    return await grpc_stream(client, MODEL, ids[base + i], 64)
                await grpc_stream(client, MODEL, ids[-1], 64)  # warm-up
                return await load(send, c, REQUESTS[c] // c, 0.1)
            finally:
                await client.close()

        base = offset
        for path, run in (("OpenAI API", api), ("gRPC", grpc)):
            for c in LEVELS:
                results, elapsed = asyncio.run(run(c, base))
                base += REQUESTS[c]
                rows.append({"path": path, "concurrency": c, **summarize(results, elapsed, 64)})
    return rows


def render(report: dict) -> str:
    by: dict[tuple, list[float]] = {}
    for r in report["runs"]:
        by.setdefault((r["setting"], r["path"], r["concurrency"]), []).append(r["tok_s"])
    lines = ["| setting | path | concurrency | output tok/s, each round | mean |", "|---|---|---|---|---|"]
    for (setting, path, c), v in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        lines.append(f"| {setting} | {path} | {c} | {', '.join(f'{x:.1f}' for x in v)} | {statistics.mean(v):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--spinning", type=int, choices=[0, 1], default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llm_backend.service import load_tokenizer
    from stack.default_model import ensure_default_model

    src = ensure_default_model(ROOT / "model_repository", name=MODEL)
    per_run = 2 * sum(REQUESTS.values()) + 2
    total = per_run * len(args.threads) * args.rounds
    texts, ids = prompts_for(load_tokenizer(src / "1"), total + 1, 38)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args), "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg(), "runs": []}
    offset = 0
    for rnd in range(args.rounds):
        for threads in args.threads:
            tmp = Path(tempfile.mkdtemp(prefix="bench-threads-"))
            repo = configured(src, tmp / "repo", threads, args.spinning)
            setting = f"intra_op_threads {threads}, ort_allow_spinning {args.spinning}"
            for row in measure(repo, tmp, texts, ids, offset):
                report["runs"].append({"setting": setting, "round": rnd, **row})
                print(f"{setting} round {rnd} {row['path']:10s} c={row['concurrency']:2d} {row['tok_s']:7.1f} tok/s "
                      f"TTFT p50 {row['ttft_p50_ms']} ms errors {row['errors']}", flush=True)
            offset += per_run
    report["load_average_after"] = os.getloadavg()
    table = render(report)
    print(table)
    write_run(
        OUT, "threads", report,
        f"# bench.threads {report['date']}\n\nThe default model through the whole stack ({os.cpu_count()} CPUs), "
        f"settings in turns over {args.rounds} rounds; 38-token prompts (each request its own), 64 greedy output "
        f"tokens; concurrency 1: 16 requests one after another; 16: 16 clients x 2. Load average "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
