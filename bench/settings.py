"""Engine settings A/B through the whole stack, in turns: onnxruntime threads and
spinning, the stream interval, any `parameters` key of the model's config.pbtxt.

For each combination of the values given, the default model is served with that
config.pbtxt (a copy of the repository's model whose version directory is a link to the
real one), and the same load as `make bench` goes through the OpenAI API and directly
over gRPC at concurrency 1 and 16: 38-token prompts, each request its own, 64 greedy
output tokens. Settings alternate round by round, so a drift of the machine hits all of
them alike.

    python -m bench.settings [--param intra_op_threads 1 2] [--param stream_interval 1 4] [--rounds 2]
                             [--stagger 0.1]

`--stagger` is the seconds between client starts (0.1 as `make bench`; 0: a burst, all at once).

Writes docs/bench-results/settings-<time>.json and .md and prints the table (output
tokens per second over each level, as `make bench`'s whole-run rate). Two defaults were
chosen with it (docs/engine.md): `intra_op_threads = 0` (every core the process may use;
on 2 cores one thread and two served the same through the API, two were 3-6% faster
over gRPC) and `stream_interval = 4`.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.results import write_run
from llm_backend.model_config import EngineParams
from bench.serving import (MODEL, OUT, ROOT, adapter_over, grpc_stream, load, openai_stream, prompts_for,
                           summarize, triton_serving)

LEVELS = (1, 16)
REQUESTS = {1: 16, 16: 64}  # per level: 16 one after another, 16 clients x 4 (as make bench)


def configured(src: Path, dest: Path, setting: dict[str, str]) -> Path:
    """A repository of one model: `src`'s config with these parameters, its version linked."""
    model = dest / MODEL
    model.mkdir(parents=True)
    os.symlink(src / "1", model / "1")
    cfg = (src / "config.pbtxt").read_text()
    known = EngineParams().__dict__
    for key, value in setting.items():
        cfg, n = re.subn(rf'(key: "{key}" value: {{ string_value: ")[^"]*(")', rf"\g<1>{value}\2", cfg)
        if n == 0 and key in known:   # an engine setting newer than this export's config
            cfg, n = re.subn(r"(\nparameters \[\n)", rf'\g<1>  {{ key: "{key}" value: {{ string_value: "{value}" }} }},\n',
                             cfg)
        if n != 1:
            raise SystemExit(f"{src / 'config.pbtxt'} has no {key} parameter")
    (model / "config.pbtxt").write_text(cfg)
    return dest


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU of a process, with its children's (Triton's Python stubs) or only
    theirs (`children=False` counts the process alone)."""
    total, pids = 0.0, [pid]
    while pids:
        p = pids.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if children:
            pids += [int(c) for c in kids]
    return total


def measure(repo: Path, tmp: Path, tok, texts: list[str], ids: list[list[int]], offset: int,
            stagger: float = 0.1) -> list[dict]:
    """Each level's rates, and the CPU each process used while it ran, in cores and per
    streamed chunk. The engine is tritonserver's child (the stub); its onnxruntime
    workers spin between operators, so it shows near every core whatever it computes."""
    rows = []
    with triton_serving(repo, tmp) as triton, adapter_over(triton, tmp) as adapter:
        async def api(c: int, base: int):
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
                async def send(i: int) -> dict:
                    return await openai_stream(http, adapter.url, MODEL, texts[base + i], 64, tok)
                await openai_stream(http, adapter.url, MODEL, texts[-1], 64)  # warm-up
                mark()
                return await load(send, c, REQUESTS[c] // c, stagger)

        async def grpc(c: int, base: int):
            import tritonclient.grpc.aio as grpcclient
            client = grpcclient.InferenceServerClient(triton.grpc_url)
            try:
                async def send(i: int) -> dict:
                    return await grpc_stream(client, MODEL, ids[base + i], 64)
                await grpc_stream(client, MODEL, ids[-1], 64)  # warm-up
                mark()
                return await load(send, c, REQUESTS[c] // c, stagger)
            finally:
                await client.close()

        def counters() -> dict[str, float]:
            server = cpu_seconds(triton.proc.pid, children=False)
            return {"adapter": cpu_seconds(adapter.proc.pid), "tritonserver": server,
                    "stub (engine)": cpu_seconds(triton.proc.pid) - server, "client": time.process_time()}

        before: dict[str, float] = {}

        def mark() -> None:
            """CPU counters after the warm-up, where the measured load begins."""
            before.update(counters())

        base = offset
        for path, run in (("OpenAI API", api), ("gRPC", grpc)):
            for c in LEVELS:
                results, elapsed = asyncio.run(run(c, base))
                cpu = {k: v - before[k] for k, v in counters().items()}
                if path == "gRPC":
                    cpu.pop("adapter")                  # idle, but for its health probes
                base += REQUESTS[c]
                chunks = max(1, sum(len(r.get("times", [])) for r in results))
                rows.append({"path": path, "concurrency": c, **summarize(results, elapsed, 64),
                             "cpu_cores": {k: round(v / elapsed, 2) for k, v in cpu.items()},
                             "cpu_ms_per_chunk": {k: round(v * 1000 / chunks, 3) for k, v in cpu.items()}})
    return rows


def render(report: dict) -> str:
    by: dict[tuple, list[dict]] = {}
    for r in report["runs"]:
        by.setdefault((r["setting"], r["path"], r["concurrency"]), []).append(r)
    lines = ["| setting | path | concurrency | output tok/s, each round | mean | tokens a chunk "
             "| CPU cores used, mean: each process | CPU ms per chunk, mean |", "|---|---|---|---|---|---|---|---|"]
    for (setting, path, c), rs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        v = [r["tok_s"] for r in rs]
        procs = rs[0].get("cpu_cores", {})
        cores = ", ".join(f"{k} {statistics.mean(r['cpu_cores'][k] for r in rs):.2f}" for k in procs)
        per_chunk = ", ".join(f"{k} {statistics.mean(r['cpu_ms_per_chunk'][k] for r in rs):.2f}" for k in procs)
        lines.append(f"| {setting} | {path} | {c} | {', '.join(f'{x:.1f}' for x in v)} | {statistics.mean(v):.1f} "
                     f"| {rs[0].get('tokens_per_chunk', '')} | {cores} | {per_chunk} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--param", nargs="+", action="append", metavar=("KEY", "VALUE"),
                    help="a config.pbtxt parameter and its values to compare (repeatable; default: "
                         "intra_op_threads 1 2)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stagger", type=float, default=0.1, help="seconds between client starts (0: all at once)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llm_backend.service import load_tokenizer
    from stack.default_model import ensure_default_model

    params = args.param or [["intra_op_threads", "1", "2"]]
    if any(len(p) < 2 for p in params):
        ap.error("--param needs a key and at least one value")
    settings = [dict(zip([p[0] for p in params], values))
                for values in itertools.product(*[p[1:] for p in params])]
    src = ensure_default_model(ROOT / "model_repository", name=MODEL)
    per_run = 2 * sum(REQUESTS.values()) + 2
    total = per_run * len(settings) * args.rounds
    tok = load_tokenizer(src / "1")
    texts, ids = prompts_for(tok, total + 1, 38)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args), "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg(), "runs": []}
    offset = 0
    for rnd in range(args.rounds):
        for setting in settings if rnd % 2 == 0 else settings[::-1]:
            tmp = Path(tempfile.mkdtemp(prefix="bench-settings-"))
            repo = configured(src, tmp / "repo", setting)
            name = ", ".join(f"{k} {v}" for k, v in setting.items())
            for row in measure(repo, tmp, tok, texts, ids, offset, args.stagger):
                report["runs"].append({"setting": name, "round": rnd, **row})
                print(f"{name} round {rnd} {row['path']:10s} c={row['concurrency']:2d} {row['tok_s']:7.1f} tok/s "
                      f"TTFT p50 {row['ttft_p50_ms']} ms errors {row['errors']}", flush=True)
            offset += per_run
    report["load_average_after"] = os.getloadavg()
    table = render(report)
    print(table)
    write_run(
        OUT, "settings", report,
        f"# bench.settings {report['date']}\n\nThe default model through the whole stack ({os.cpu_count()} CPUs), "
        f"settings in turns over {args.rounds} rounds; 38-token prompts (each request its own), 64 greedy output "
        f"tokens; concurrency 1: 16 requests one after another; 16: 16 clients x 4, starting {args.stagger} s "
        f"apart. Load average "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
