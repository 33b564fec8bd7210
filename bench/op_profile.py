"""Where a decode step's time goes, by operator type: the default export, in process.

    python -m bench.op_profile [--rows 1 16] [--context 100] [--steps 40]

For each row count, the engine's `Decoder` (the session and KV slots the backend
serves with) fills that many rows with `--context` positions, times `--steps` decode
steps, then runs them again under onnxruntime's profiler and sums its kernel times by
operator type, over the decode steps only. The profiler costs time between the nodes (a
one-row step of about 1000 nodes took twice as long under it), and its kernel times add
up to more than a plain step, so the table gives each type's share of the profiled
kernel time beside the plain step's time. Writes
docs/bench-results/op-profile-<time>.json and .md. Not a test.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.results import write_run
from bench.serving import MODEL, OUT, ROOT


def step_times(dec, rows: int, context: int, steps: int) -> list[float]:
    tokens = np.full(rows, 1000, dtype=np.int64)
    lengths = np.full(rows, context, dtype=np.int64)
    for _ in range(5):
        dec.decode(tokens, lengths)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        dec.decode(tokens, lengths)
        out.append(time.perf_counter() - t)
    return out


def by_op_type(trace: list[dict], skip_runs: int) -> tuple[dict[str, float], dict[str, int], int]:
    """Kernel microseconds and node runs by operator type over the model runs after the
    first `skip_runs` (the prefills that filled the rows), and how many runs that is."""
    model_runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    runs = model_runs[skip_runs:]
    if not runs:
        raise ValueError("the profile holds no decode step")
    start = runs[0]["ts"]
    us: dict[str, float] = collections.Counter()
    nodes: dict[str, int] = collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"].get("op_name", "?")
            if op == "If":   # its time is its branch's nodes', which are counted themselves
                continue
            us[op] += e["dur"]
            nodes[op] += 1
    return us, nodes, len(runs)


def profile(model_dir: Path, rows: int, context: int, steps: int, tmp: Path) -> dict:
    import onnxruntime as ort

    from llm_backend.decoder import Decoder

    def decoder(profiled: bool):
        real = ort.SessionOptions

        class Options(real):   # the Decoder builds its own options: profiling goes in here
            def __init__(self):
                super().__init__()
                if profiled:
                    self.enable_profiling = True
                    self.profile_file_prefix = str(tmp / f"ort-{rows}")
        ort.SessionOptions = Options
        try:
            dec = Decoder(model_dir, num_slots=rows, max_len=context + steps + 16)
        finally:
            ort.SessionOptions = real
        rng = np.random.default_rng(0)
        for r in range(rows):
            dec.prefill(r, rng.integers(100, 20000, context).tolist(), 0)
        return dec

    plain = float(np.median(step_times(decoder(False), rows, context, steps)))
    dec = decoder(True)
    profiled = float(np.median(step_times(dec, rows, context, steps)))
    trace = json.loads(Path(dec.session.end_profiling()).read_text())
    # the prefills that filled the rows ran under the profiler too, unless the export has a
    # prefill session of its own (4-bit exports)
    us, nodes, runs = by_op_type(trace, skip_runs=rows if dec.prefill_session is dec.session else 0)
    total = sum(us.values())
    table = [{"op": op, "nodes": round(nodes[op] / runs), "kernel_ms": round(us[op] / runs / 1e3, 3),
              "share": round(us[op] / total, 3)} for op in sorted(us, key=us.get, reverse=True)]
    return {"rows": rows, "context": context, "step_ms": round(plain * 1e3, 2),
            "profiled_step_ms": round(profiled * 1e3, 2), "kernel_ms": round(total / runs / 1e3, 2),
            "decode_runs": runs, "ops": table}


def render(report: dict) -> str:
    lines = [f"# bench.op_profile {report['date']}", "",
             f"The default export ({report['model']}), a decode step with every row at "
             f"{report['context']} positions, in process. Kernel time by operator type from "
             "onnxruntime's profiler, over the decode steps; under the profiler the kernels add up "
             "to more than a plain step, so read the shares.", ""]
    for r in report["runs"]:
        lines += [f"## {r['rows']} row(s): step {r['step_ms']} ms (under the profiler {r['profiled_step_ms']} ms, "
                  f"its kernels {r['kernel_ms']} ms)", "",
                  "| operator | nodes a step | kernel ms a step | share of the kernel time |",
                  "|---|---|---|---|"]
        for op in r["ops"]:
            if op["kernel_ms"] >= 0.01:
                lines.append(f"| {op['op']} | {op['nodes']} | {op['kernel_ms']:.2f} | {op['share']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=100, help="positions filled in each row (default 100)")
    ap.add_argument("--steps", type=int, default=40, help="decode steps timed (default 40)")
    args = ap.parse_args(argv)

    from stack.default_model import ensure_default_model

    model_dir = ensure_default_model(ROOT / "model_repository", name=MODEL) / "1"
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(model_dir.relative_to(ROOT)),
              "context": args.context, "settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        for rows in args.rows:
            run = profile(model_dir, rows, args.context, args.steps, Path(tmp))
            report["runs"].append(run)
            print(f"{rows} rows: step {run['step_ms']} ms", flush=True)
    table = render(report)
    print(table)
    write_run(OUT, "op-profile", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
