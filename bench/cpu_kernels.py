"""What our own CPU kernels (llm_backend/cpu_ops) save: the engine's Decoder on the default
export with them and without, in turns.

    python -m bench.cpu_kernels [--rows 1 16] [--context 100] [--rounds 3] [--steps 150] [--chunks 12]

Each measurement is a process of its own (two sessions in one process disturbed each
other's timings: their onnxruntime workers spin): it loads the export into the
`Decoder` the backend serves with (`cpu_kernels` on or off), fills `--rows` rows with
`--context` random prompt tokens in one batched prefill, times that prefill and then
`--steps` decode steps. The two take turns, `--rounds` times per row count, and the
table gives each one's median over its rounds and the ratio. Before timing, fidelity:
KL to the fp32 export at every position of `--chunks` held-out texts (bench.int4_fidelity's),
without and with the kernels, through the same Decoder.
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


def fidelity(model_dir: Path, chunks: int, max_tokens: int = 160) -> dict:
    """KL(fp32 || the default export) at every position of held-out text, without and
    with the kernels: the logits of each token, fed one at a time through the Decoder as
    the engine serves (prefill of the first, then decode steps). RowQuantize computes
    the same bytes; GroupAttention the same attention within float rounding, which the
    int8 activations downstream can turn into other rounding steps."""
    import tempfile

    from tokenizers import Tokenizer

    from bench.int4_fidelity import held_out_text
    from export.verify import kl_divergence
    from llm_backend.decoder import Decoder
    from stack.default_model import ensure_default_model

    with tempfile.TemporaryDirectory(prefix="cpu-kernels-") as tmp:
        reference_dir = ensure_default_model(Path(tmp), precision="fp32") / "1"
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        samples = [tok.encode(t).ids[:max_tokens] for t in held_out_text(chunks)]

        def logits(dec) -> list[np.ndarray]:
            out = []
            for ids in samples:
                rows = [dec.prefill(0, ids[:1], 0)]
                rows += [dec.decode(np.array([t]), np.array([i]))[0] for i, t in enumerate(ids[1:], 1)]
                out.append(np.stack(rows))
            return out

        ref = logits(Decoder(reference_dir, num_slots=1, max_len=max_tokens + 8, cpu_kernels=False))
    result = {}
    for name, kernels in (("exported", False), ("kernels", True)):
        got = logits(Decoder(model_dir, num_slots=1, max_len=max_tokens + 8, cpu_kernels=kernels))
        kl = np.concatenate([kl_divergence(r, g) for r, g in zip(ref, got)])
        top1 = np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)])
        result[name] = {"positions": int(kl.size), "kl_mean": round(float(kl.mean()), 4),
                        "kl_p90": round(float(np.percentile(kl, 90)), 4), "top1_agree": round(float(top1.mean()), 4)}
    return result


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
             f"{s['steps']} decode steps. Medians over the rounds.", ""]
    if "fidelity" in report:
        lines += ["| fidelity to the fp32 export | positions | KL mean | KL p90 | top-1 agrees |", "|---|---|---|---|---|"]
        for name, label in (("exported", "as exported"), ("kernels", "with the kernels")):
            f = report["fidelity"][name]
            lines.append(f"| {label} | {f['positions']} | {f['kl_mean']:.4f} | {f['kl_p90']:.4f} "
                         f"| {f['top1_agree']:.1%} |")
        lines.append("")
    lines += ["| rows | decode step, as exported | with the kernels | ratio | batched prefill, as exported "
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
    ap.add_argument("--chunks", type=int, default=12, help="held-out texts for the fidelity (default 12; 0: none)")
    args = ap.parse_args(argv)

    from stack.default_model import ensure_default_model

    model_dir = ensure_default_model(ROOT / "model_repository", name=MODEL) / "1"
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(model_dir.relative_to(ROOT)),
              "settings": vars(args), "rows": []}
    if args.chunks:
        report["fidelity"] = fidelity(model_dir, args.chunks)
        print(json.dumps(report["fidelity"]), flush=True)
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
