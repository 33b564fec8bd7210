"""What our own CPU kernels (llm_backend/cpu_ops) save: the engine's Decoder on the default
export with them and without, in turns.

    python -m bench.cpu_kernels [--rows 1 16] [--context 100] [--rounds 3] [--steps 150]

Each measurement is a process of its own (two sessions in one process disturbed each
other's timings: their onnxruntime workers spin): it loads the export into the
`Decoder` the backend serves with (`cpu_kernels` on or off), fills `--rows` rows with
`--context` random prompt tokens in one batched prefill, times that prefill and then
`--steps` decode steps. The two take turns, `--rounds` times per row count, and the
table gives each one's median over its rounds and the ratio. Before timing, one process
checks that both give the same logits bit for bit (the kernels compute the same bytes).
Writes docs/bench-results/cpu-kernels-<time>.json and .md. Not a test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.results import write_run
from bench.serving import MODEL, OUT, ROOT


def _decoder(model_dir: Path, rows: int, context: int, steps: int, kernels: bool):
    from llm_backend.decoder import Decoder

    dec = Decoder(model_dir, num_slots=rows, max_len=context + steps + 16, cpu_kernels=kernels)
    if kernels and dec.kernel_library is None:
        raise SystemExit("the CPU kernels do not build here (see the log above)")
    prompts = np.random.default_rng(0).integers(100, 20000, (rows, context)).tolist()
    return dec, prompts


def measure(model_dir: Path, rows: int, context: int, steps: int, kernels: bool) -> dict:
    """One process's measurement: the batched prefill's time and the decode steps'."""
    from bench.op_profile import step_times

    dec, prompts = _decoder(model_dir, rows, context, steps, kernels)
    prefills = []
    for _ in range(3):
        t = time.perf_counter()
        dec.prefill_batch(0, prompts)
        prefills.append(time.perf_counter() - t)
    steps_s = step_times(dec, rows, context, steps)
    return {"prefill_ms": round(float(np.median(prefills)) * 1e3, 2),
            "step_ms": round(float(np.median(steps_s)) * 1e3, 3)}


def same_logits(model_dir: Path, rows: int = 3, context: int = 40) -> bool:
    """Both ways give the same logits for a batched prefill and a decode step."""
    got = []
    for kernels in (False, True):
        dec, prompts = _decoder(model_dir, rows, context, 8, kernels)
        first = dec.prefill_batch(0, prompts)
        step = dec.decode(np.array([42] * rows), np.array([context] * rows))
        got.append((first.copy(), step.copy()))
    return all(np.array_equal(a, b) for a, b in zip(*got))


def _child(model_dir: Path, rows: int, args, kernels: bool) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.cpu_kernels", "--one", str(model_dir), str(rows),
                          str(args.context), str(args.steps), "1" if kernels else "0"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(report: dict) -> str:
    s = report["settings"]
    lines = [f"# bench.cpu_kernels {report['date']}", "",
             f"The default export ({report['model']}) in the engine's Decoder, without and with our own CPU "
             f"kernels (llm_backend/cpu_ops), each measurement a process of its own, in turns ({s['rounds']} "
             f"rounds); rows filled with {s['context']} prompt tokens in one batched prefill, then "
             f"{s['steps']} decode steps. Medians over the rounds. Same logits bit for bit: "
             f"{'yes' if report['same_logits'] else 'NO'}.", "",
             "| rows | decode step, as exported | with the kernels | ratio | batched prefill, as exported "
             "| with the kernels | ratio |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['rows']} | {r['exported_step_ms']:.2f} ms | {r['kernels_step_ms']:.2f} ms "
                     f"| {r['step_ratio']:.3f}x | {r['exported_prefill_ms']:.1f} ms | {r['kernels_prefill_ms']:.1f} ms "
                     f"| {r['prefill_ratio']:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:   # a child: one measurement, printed as JSON
        model_dir, rows, context, steps, kernels = argv[1:6]
        print(json.dumps(measure(Path(model_dir), int(rows), int(context), int(steps), kernels == "1")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=100, help="prompt tokens in each row (default 100)")
    ap.add_argument("--steps", type=int, default=150, help="decode steps timed a process (default 150)")
    ap.add_argument("--rounds", type=int, default=3, help="turns of the two, per row count (default 3)")
    args = ap.parse_args(argv)

    from stack.default_model import ensure_default_model

    model_dir = ensure_default_model(ROOT / "model_repository", name=MODEL) / "1"
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(model_dir.relative_to(ROOT)),
              "settings": vars(args), "same_logits": same_logits(model_dir), "rows": []}
    if not report["same_logits"]:
        print("the kernels change the logits: not timed", file=sys.stderr)
        return 1
    for rows in args.rows:
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for kernels in (False, True):
                runs[kernels].append(_child(model_dir, rows, args, kernels))
        med = {k: {m: float(np.median([r[m] for r in v])) for m in ("step_ms", "prefill_ms")} for k, v in runs.items()}
        row = {"rows": rows, "exported_step_ms": med[False]["step_ms"], "kernels_step_ms": med[True]["step_ms"],
               "exported_prefill_ms": med[False]["prefill_ms"], "kernels_prefill_ms": med[True]["prefill_ms"],
               "runs": {"exported": runs[False], "kernels": runs[True]}}
        row["step_ratio"] = round(row["kernels_step_ms"] / row["exported_step_ms"], 3)
        row["prefill_ratio"] = round(row["kernels_prefill_ms"] / row["exported_prefill_ms"], 3)
        report["rows"].append(row)
        print(f"{rows} rows: step {row['exported_step_ms']:.2f} -> {row['kernels_step_ms']:.2f} ms "
              f"({row['step_ratio']:.3f}x), prefill {row['exported_prefill_ms']:.1f} -> "
              f"{row['kernels_prefill_ms']:.1f} ms", flush=True)
    table = render(report)
    print(table)
    write_run(OUT, "cpu-kernels", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
