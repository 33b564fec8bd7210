"""How far each 4-bit form of the default model is from the source, and how fast it decodes.

    python -m bench.int4_fidelity [--chunks 40] [--rounds 24]

Models: the fp32 export (the reference), the int4 export as `llm-export` makes it
(activation-aware, blocks of 64/32: export/int4_requant.py), the model builder's own
int4 (`--int4-weights builder`: k_quant, blocks of 32), the w8a8 export for scale, and,
when `make llama-venv` has built it, llama.cpp on the Q4_1 GGUF the default model ships
as (the one-stream baseline of bench.engine).

Fidelity: next-token distributions at every position of held-out text, KL(fp32 || int4)
mean / p90 / max and how often the top-1 token agrees. The text is chunks of this
Python's standard library sources and of the system's license texts (code and English
prose), chosen by a fixed seed: text the calibration (export/calibration.py) never saw.

Speed: one-row decode steps of the two int4 exports, taking turns in one process
(--rounds turns of 25 steps each), as the ratio of step times; the machine's drift
cancels in the ratio. Writes bench/results/int4-fidelity-<time>.json and .md.

Not a test.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.engine import REPO_ROOT, RESULTS
from bench.results import write_run


def held_out_text(chunks: int, seed: int = 1, chars: int = 700) -> list[str]:
    """Chunks of standard-library sources and license texts, by a fixed seed."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    files += sorted(glob.glob("/usr/share/common-licenses/*"))
    rnd, out = random.Random(seed), []
    while len(out) < chunks:
        try:
            text = Path(rnd.choice(files)).read_text(errors="ignore")
        except OSError:
            continue
        if len(text) < 3 * chars:
            continue
        start = rnd.randrange(0, len(text) - 2 * chars)
        piece = text[start:start + chars]
        if piece.count("\n") <= 40:   # no long runs of blank or one-word lines
            out.append(piece)
    return out


def onnx_logits(version_dir: Path, samples: list[list[int]]) -> list[np.ndarray]:
    """Logits at every position, one pass per sample, as the builder's graph computes them."""
    import onnxruntime as ort

    from export.verify import whole_sequence_feed

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(version_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    decoder = json.loads((version_dir / "genai_config.json").read_text())["model"]["decoder"]
    inputs = [i.name for i in session.get_inputs()]
    return [session.run(["logits"], whole_sequence_feed(inputs, decoder, ids))[0][0].astype(np.float32)
            for ids in samples]


def llama_logits(python: Path, gguf: Path, samples: list[list[int]]) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.json"
        ids.write_text(json.dumps(samples))
        subprocess.run([str(python), str(REPO_ROOT / "bench" / "llamacpp.py"), "logits", str(gguf), str(ids),
                        str(Path(tmp) / "logits.npz")], check=True, capture_output=True, timeout=900)
        data = np.load(Path(tmp) / "logits.npz")
        return [data[f"s{i}"] for i in range(len(samples))]


def fidelity(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    from export.verify import kl_divergence

    kl = np.concatenate([kl_divergence(r, g) for r, g in zip(ref, got)])
    top1 = np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)])
    return {"positions": int(kl.size), "kl_mean": round(float(kl.mean()), 4),
            "kl_p90": round(float(np.percentile(kl, 90)), 4), "kl_max": round(float(kl.max()), 3),
            "top1_agree": round(float(top1.mean()), 4)}


def step_ratio(dirs: list[Path], rounds: int, steps: int = 25) -> list[dict]:
    """One-row decode steps of each export by turns; median step ms and ratio to the first."""
    from llm_backend.decoder import Decoder

    decs = [Decoder(d, num_slots=1, max_len=512, intra_op_threads=2) for d in dirs]
    prompt = list(range(100, 138))
    state = []
    for dec in decs:
        state.append([int(dec.prefill(0, prompt, 0).argmax()), len(prompt)])

    def run(i: int) -> float:
        dec, st = decs[i], state[i]
        start = time.perf_counter()
        for _ in range(steps):
            logits = dec.decode(np.array([st[0]]), np.array([st[1]]))
            st[0] = int(logits[0].argmax())
            st[1] = st[1] + 1 if st[1] < 160 else len(prompt)   # lengths 38-160, over and over
        return (time.perf_counter() - start) / steps * 1000

    for i in range(len(decs)):
        run(i)                                       # warm up
    times = []
    for r in range(rounds):
        order = list(range(len(decs)))[::1 if r % 2 == 0 else -1]   # ABAB... then BABA...
        t = {i: run(i) for i in order}
        times.append([t[i] for i in range(len(decs))])
    times = np.array(times)
    return [{"step_ms_median": round(float(np.median(times[:, i])), 2),
             "step_ratio": round(float(np.median(times[:, i] / times[:, 0])), 3)} for i in range(len(decs))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=40, help="held-out text chunks (default 40)")
    ap.add_argument("--rounds", type=int, default=24, help="turns of the step-time comparison (default 24)")
    ap.add_argument("--llamacpp-python", type=Path, default=REPO_ROOT / ".cache" / "llama-venv" / "bin" / "python")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    from export.default_model import fetch_default_gguf, fetch_default_model
    from export.pipeline import ExportOptions, run_export
    from llm_backend.decoder import int8_gemm_is_exact
    from stack.default_model import ensure_default_model

    with tempfile.TemporaryDirectory(prefix="int4-fidelity-") as tmp:
        repo = Path(tmp)
        print("exports: fp32, int4 (cached), int4 with the builder's weights (~1 min) ...", flush=True)
        fp32 = ensure_default_model(repo / "fp32", precision="fp32") / "1"
        ours = ensure_default_model(repo / "int4", precision="int4") / "1"
        builder = run_export(fetch_default_model(), ExportOptions(
            name="builder-int4", repository=repo, precision="int4", int4_weights="builder", quiet=True)).version_dir
        tok = Tokenizer.from_file(str(fp32 / "tokenizer.json"))
        samples = [tok.encode(t).ids for t in held_out_text(args.chunks)]
        print(f"held-out text: {len(samples)} chunks, {sum(map(len, samples))} tokens", flush=True)
        ref = onnx_logits(fp32, samples)
        rows = {"int4, activation-aware, blocks 64/32 (llm-export)": fidelity(ref, onnx_logits(ours, samples)),
                "int4, builder k_quant, blocks of 32": fidelity(ref, onnx_logits(builder, samples))}
        if int8_gemm_is_exact():
            w8a8 = ensure_default_model(repo / "w8a8", precision="w8a8") / "1"
            rows["w8a8 (the default export), for scale"] = fidelity(ref, onnx_logits(w8a8, samples))
        if args.llamacpp_python.exists():
            rows["llama.cpp Q4_1 GGUF (bench.engine's baseline)"] = fidelity(
                ref, llama_logits(args.llamacpp_python, fetch_default_gguf(), samples))
        print("one-row decode steps by turns ...", flush=True)
        speed = step_ratio([builder, ours], args.rounds)
    names = list(rows)
    rows[names[1]].update(speed[0])
    rows[names[0]].update(speed[1])
    lines = ["| model | KL mean | KL p90 | KL max | top-1 agrees | one-row step (ratio to builder int4) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        step = f"{r['step_ms_median']} ms ({r['step_ratio']:.3f})" if "step_ratio" in r else ""
        lines.append(f"| {name} | {r['kl_mean']} | {r['kl_p90']} | {r['kl_max']} | {r['top1_agree']:.1%} | {step} |")
    table = (f"# bench.int4_fidelity {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
             f"KL(fp32 || model) of the next-token distribution at {rows[names[0]]['positions']} positions of "
             f"held-out text ({args.chunks} chunks); step times from {args.rounds} turns of 25 one-row "
             "decode steps in one process.\n\n" + "\n".join(lines) + "\n")
    print("\n" + table)
    write_run(RESULTS, "int4-fidelity", {"rows": rows, "chunks": args.chunks}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
