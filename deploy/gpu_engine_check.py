"""The engine's GPU path in one process, without tritonserver: export the default model
for CUDA (fp16), verify it on the GPU, load it with the `llm` backend's engine on device
cuda, decode greedily alone and 16 at a time, and time decode steps at 1, 16 and 64 rows.

    python deploy/gpu_engine_check.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR

Made for a short lease of a GPU machine (nothing reachable from it, a few minutes):
every stage is timed and recorded, a failing stage does not stop the ones that do not
need it, results are written after each stage (DIR/gpu-engine.json and .md), and the
whole run stops itself at --deadline seconds. Needs torch with CUDA, onnxruntime-gpu
(CUDA 13), onnxruntime-genai (the model builder), transformers and gguf.

Stage `verify` runs the export's verification (export.verify.verify_export, fp16
criteria) on the target's execution provider, as `llm-export` itself now does where
onnxruntime has the CUDA provider (the first run on an H200 verified it this way).

`--device cpu` is a dry run of the same code on the CPU (the fp16 graph on the CPU
execution provider), for checking this script without a GPU; `--checkpoint DIR` and
`--version-dir DIR` skip the GGUF conversion and the export.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from deploy.gpu_check import PROMPTS as CHECK_PROMPTS  # noqa: E402  (the path is set above)
from export.default_model import MODEL_ID  # noqa: E402

# gpu_check.py's prompts and eight more: 16 rows for the batched-against-alone comparison
PROMPTS = CHECK_PROMPTS + [
    "List the planets of the solar system.",
    "Who wrote Romeo and Juliet?",
    "Write one sentence about autumn leaves.",
    "What does a compiler do?",
    "Suggest a name for a small orange cat.",
    "How many legs does a spider have?",
    "Describe the taste of a lemon in a few words.",
    "What is the largest ocean on Earth?",
]


class Deadline(Exception):
    pass


def _on_alarm(signum, frame):
    raise Deadline("the run's deadline passed")


class Run:
    """Results so far, written out after every stage."""

    def __init__(self, out: Path, deadline_s: float):
        self.out = out
        self.t0 = time.monotonic()
        self.deadline_s = deadline_s
        self.r: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.t0)

    def stage(self, name: str, fn, *args, need_s: float = 0.0, **kw):
        """Run one stage; record its time, result or error. Returns its result or None."""
        if self.left() < need_s:
            self.r["stages"][name] = {"ok": False, "skipped": f"{self.left():.0f} s left, needs ~{need_s:.0f} s"}
            print(f"[gpu-check] {name}: SKIPPED ({self.left():.0f} s left)", flush=True)
            self.write()
            return None
        print(f"[gpu-check] {name} ... ({self.left():.0f} s left)", flush=True)
        t = time.monotonic()
        try:
            value = fn(*args, **kw)
            self.r["stages"][name] = {"ok": True, "seconds": round(time.monotonic() - t, 2)}
            print(f"[gpu-check] {name}: ok in {time.monotonic() - t:.1f} s", flush=True)
            return value
        except (Exception, Deadline) as err:
            self.r["stages"][name] = {"ok": False, "seconds": round(time.monotonic() - t, 2),
                                      "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()[-4000:]}
            print(f"[gpu-check] {name}: FAILED after {time.monotonic() - t:.1f} s: {type(err).__name__}: {err}",
                  flush=True)
            traceback.print_exc()
            if isinstance(err, Deadline):
                raise
            return None
        finally:
            self.write()

    def write(self) -> None:
        self.r["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "gpu-engine.json").write_text(json.dumps(self.r, indent=2, default=str))
        (self.out / "gpu-engine.md").write_text(render_markdown(self.r))


# -- stages -------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    env = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
           "ort_providers": ort.get_available_providers(), "device": device,
           "cpu_count": os.cpu_count()}
    for mod in ("onnx", "onnx_ir", "transformers", "tokenizers", "onnxruntime_genai", "gguf"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - recorded
            env[mod] = f"unavailable: {type(err).__name__}: {err}"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        env["gpu_mem_free_gib"], env["gpu_mem_total_gib"] = round(free / 2**30, 1), round(total / 2**30, 1)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime {ort.__version__} ({ort.__file__}) has no CUDAExecutionProvider")
    return env


def convert_gguf(gguf: Path, out_dir: Path) -> str:
    """The project's own GGUF -> Hugging Face checkpoint step (export.default_model)."""
    from export.default_model import gguf_to_checkpoint

    if (out_dir / "config.json").exists():
        return "exists"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    gguf_to_checkpoint(gguf, tmp)
    tmp.rename(out_dir)
    return "converted"


def run_export(ckpt: Path, repo: Path, precision: str, max_num_seqs: int, log_path: Path) -> dict:
    from export.publish import versions

    cmd = [sys.executable, "-m", "export.cli", str(ckpt), "--name", MODEL_ID, "--repository", str(repo),
           "--precision", precision, "--device", "cuda", "--max-num-seqs", str(max_num_seqs)]
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - t
    log_path.write_text(proc.stdout)
    print(proc.stdout[-6000:], flush=True)
    res = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "seconds": round(seconds, 1),
           "output_tail": proc.stdout[-3000:]}
    if proc.returncode != 0:
        raise RuntimeError(f"llm-export exited {proc.returncode}: {proc.stdout[-1500:]}")
    version_dir = repo / MODEL_ID / str(versions(repo / MODEL_ID)[-1])
    res["version_dir"] = str(version_dir)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    res["manifest_verification"] = manifest.get("verification")
    res["build_seconds"] = manifest.get("build_seconds")
    res["sizes"] = manifest.get("sizes")
    res["builder_options"] = manifest.get("builder_options")
    return res


def verify_on_device(ckpt_dir: Path, version_dir: Path, precision: str, device: str) -> dict:
    """export.verify.verify_export as llm-export runs it, the ONNX side on `device`'s
    execution provider (the source model stays fp32 on the CPU)."""
    from types import SimpleNamespace

    import export.verify as V
    from export.validate import validate_checkpoint

    opts = SimpleNamespace(device=device, precision=precision, verify_tokens=32, quiet=False)
    result = V.verify_export(validate_checkpoint(ckpt_dir), version_dir, opts)
    result["onnx_providers"] = [result.get("execution_provider", "none: " + result.get("reason", ""))]
    result.pop("probes", None)
    return result


class Sink:
    def __init__(self):
        self.event = threading.Event()
        self.text: list[str] = []
        self.logprobs: list[float] = []
        self.reason = self.error = None
        self.n_in = self.n_out = 0
        self.t0 = time.monotonic()
        self.t_end = None

    def is_cancelled(self) -> bool:
        return False

    def piece(self, text, logprobs, n_in, n_out):
        self.text.append(text)
        self.logprobs.extend(logprobs or [])

    def finish(self, text, logprobs, reason, n_in, n_out):
        self.text.append(text)
        self.logprobs.extend(logprobs or [])
        self.reason, self.n_in, self.n_out = reason, n_in, n_out
        self.t_end = time.monotonic()
        self.event.set()

    def fail(self, kind, message):
        self.error, self.t_end = f"{kind}{message}", time.monotonic()
        self.event.set()

    def record(self) -> dict:
        return {"text": "".join(self.text), "finish_reason": self.reason, "prompt_tokens": self.n_in,
                "output_tokens": self.n_out, "error": self.error, "logprobs": self.logprobs,
                "seconds": round((self.t_end or time.monotonic()) - self.t0, 3)}


def chat_prompts(params, tok) -> list[list[int]]:
    import jinja2

    from llm_backend.preprocess import encode

    tmpl = jinja2.Environment().from_string(params.chat_template)
    out = []
    for p in PROMPTS:
        text = tmpl.render(messages=[{"role": "user", "content": p}], add_generation_prompt=True,
                           bos_token=params.bos_token, eos_token=params.eos_token)
        out.append(encode(tok, text))
    return out


def generate(core, prompts: list[list[int]], max_tokens: int, timeout: float, *, ignore_eos=False,
             logprobs=True) -> list[dict]:
    """Submit all `prompts` at once (greedy), wait for all."""
    from llm_backend.sampling import SamplingParams

    sinks = []
    for p in prompts:
        s = Sink()
        core.add_request(p, SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs,
                                           ignore_eos=ignore_eos), s)
        sinks.append(s)
    end = time.monotonic() + timeout
    for s in sinks:
        if not s.event.wait(max(0.0, end - time.monotonic())):
            raise TimeoutError(f"generation did not finish within {timeout:.0f} s")
    return [s.record() for s in sinks]


def compare(alone: list[dict], batch: list[dict]) -> dict:
    rows = []
    for i, (a, b) in enumerate(zip(alone, batch)):
        la, lb = a["logprobs"], b["logprobs"]
        common = min(len(la), len(lb))
        diff = max((abs(x - y) for x, y in zip(la[:common], lb[:common])), default=0.0)
        first = next((j for j in range(common) if la[j] != lb[j]), None)
        rows.append({"prompt": i, "same_text": a["text"] == b["text"],
                     "same_logprobs_bitwise": la == lb, "max_abs_logprob_diff": diff,
                     "first_logprob_difference_at": first, "tokens_alone": a["output_tokens"],
                     "tokens_batch": b["output_tokens"]})
    return {"same_text": sum(r["same_text"] for r in rows), "of": len(rows),
            "same_logprobs_bitwise": sum(r["same_logprobs_bitwise"] for r in rows),
            "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in rows), "rows": rows}


def engine_params(version_dir: Path, device: str):
    """The export's own engine settings (its manifest), on `device`."""
    from llm_backend.model_config import EngineParams

    params = EngineParams(**json.loads((version_dir / "manifest.json").read_text())["engine_params"])
    params.device = device
    return params


def engine_runs(version_dir: Path, device: str, max_tokens: int, prefix_cache: bool, timeout: float) -> dict:
    """load_engine (as model.py does) on `device`; each prompt alone, then all 16 at once."""
    import numpy as np

    from llm_backend.service import load_engine

    params = engine_params(version_dir, device)
    if not prefix_cache:
        params.prefix_cache_mb = 0
    t = time.monotonic()
    engine, tok = load_engine(version_dir, params)
    res = {"load_seconds": round(time.monotonic() - t, 2), "prefix_cache_mb": params.prefix_cache_mb}
    core = engine.core
    dec = core.dec
    res["decoder"] = {"slots": dec.num_slots, "max_len": dec.max_len, "kv_dtype": np.dtype(dec.kv_dtype).name,
                      "providers": dec.session.get_providers(), "row_bytes": dec.row_bytes,
                      "threads": dec.threads}
    try:
        prompts = chat_prompts(params, tok)
        res["prompt_tokens"] = [len(p) for p in prompts]
        generate(core, prompts[:1], 4, timeout)          # warm-up
        t = time.monotonic()
        alone = [generate(core, [p], max_tokens, timeout)[0] for p in prompts]
        res["alone_seconds"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        batch = generate(core, prompts, max_tokens, timeout)
        res["batch_seconds"] = round(time.monotonic() - t, 2)
        res["alone"] = alone
        res["batch"] = batch
        res["comparison"] = compare(alone, batch)
    finally:
        engine.close(drain_timeout=5)
    return res, engine


def throughput(version_dir: Path, device: str, concurrency: int, max_tokens: int, timeout: float) -> dict:
    """`concurrency` requests at once, ignore_eos, `max_tokens` each, no log-probs (default
    engine settings), twice on one engine: the first run meets each batch size's shapes
    for the first time, the second the same shapes again."""
    from llm_backend.service import load_engine

    params = engine_params(version_dir, device)
    engine, tok = load_engine(version_dir, params)
    try:
        from llm_backend.preprocess import encode

        base = chat_prompts(params, tok)
        prompts = [base[i % len(base)] + encode(tok, f" ({i})") for i in range(concurrency)]
        generate(engine.core, prompts[:2], 4, timeout)
        runs = []
        for _ in range(2):
            t = time.monotonic()
            out = generate(engine.core, prompts, max_tokens, timeout, ignore_eos=True, logprobs=False)
            wall = time.monotonic() - t
            tokens = sum(o["output_tokens"] for o in out)
            runs.append({"seconds": round(wall, 3), "output_tokens": tokens, "tok_s": round(tokens / wall, 1),
                         "errors": [o["error"] for o in out if o["error"]][:3]})
            print(f"  {concurrency} x {max_tokens} tokens: {tokens / wall:.0f} tok/s", flush=True)
        return {"concurrency": concurrency, "max_tokens": max_tokens, "logprobs": False,
                "output_tokens": runs[0]["output_tokens"], "seconds": runs[0]["seconds"],
                "tok_s": runs[0]["tok_s"], "errors": runs[0]["errors"], "second_run": runs[1],
                "slots": engine.core.dec.num_slots}
    finally:
        engine.close(drain_timeout=5)


def step_times(dec, rows_list=(1, 16, 64), lengths=(128, 1024), reps: int = 30) -> dict:
    """Decoder.decode on rows [0, n), every row at `length` positions (KV contents do not
    change the work), and Decoder.prefill of a prompt alone. Milliseconds per call (the
    call returns the logits on the host: it includes the device's work)."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = dec.spec.vocab_size
    out = {"decode": [], "prefill": []}
    for length in lengths:
        for n in rows_list:
            if n > dec.num_slots or length + 1 > dec.max_len:
                out["decode"].append({"rows": n, "length": length, "skipped": f"{dec.num_slots} slots"})
                continue
            tokens = rng.integers(0, vocab, n)
            lens = np.full(n, length, dtype=np.int64)
            for _ in range(5):
                dec.decode(tokens, lens)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                dec.decode(tokens, lens)
                ts.append((time.perf_counter() - t) * 1000)
            ts.sort()
            med = statistics.median(ts)
            out["decode"].append({"rows": n, "length": length, "median_ms": round(med, 3),
                                  "min_ms": round(ts[0], 3), "p90_ms": round(ts[int(0.9 * (len(ts) - 1))], 3),
                                  "tokens_per_s": round(n / med * 1000, 1), "reps": reps})
            print(f"  decode {n:3d} rows at {length:5d} positions: median {med:.3f} ms "
                  f"(min {ts[0]:.3f}), {n / med * 1000:.0f} tok/s", flush=True)
    for n in (128, 512):
        if n > dec.max_len:
            continue
        prompt = rng.integers(0, vocab, n).tolist()
        for _ in range(2):
            dec.prefill(0, prompt, 0)
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            dec.prefill(0, prompt, 0)
            ts.append((time.perf_counter() - t) * 1000)
        med = statistics.median(ts)
        out["prefill"].append({"tokens": n, "median_ms": round(med, 3), "min_ms": round(min(ts), 3)})
        print(f"  prefill {n} tokens: median {med:.3f} ms", flush=True)
    return out


# -- report -------------------------------------------------------------------------------------

def render_markdown(r: dict) -> str:
    env = r.get("environment") or {}
    lines = [f"# GPU engine check, {r.get('date')}", ""]
    lines.append(f"Device: {env.get('gpu', env.get('device', '?'))}; torch {env.get('torch')} (CUDA "
                 f"{env.get('torch_cuda')}), onnxruntime {env.get('onnxruntime')} "
                 f"({', '.join(env.get('ort_providers', []))}), onnxruntime-genai {env.get('onnxruntime_genai')}, "
                 f"transformers {env.get('transformers')}, onnx {env.get('onnx')}, numpy {env.get('numpy')}, "
                 f"Python {env.get('python')}. Run device: {r.get('device')}.")
    lines += ["", "| stage | result | seconds |", "|---|---|---|"]
    for name, s in r.get("stages", {}).items():
        what = "ok" if s.get("ok") else ("skipped: " + s["skipped"] if "skipped" in s
                                          else "FAILED: " + s.get("error", "")[:300].replace("|", "/").replace("\n", " "))
        lines.append(f"| {name} | {what} | {s.get('seconds', '')} |")
    ex = r.get("export")
    if ex:
        mv = ex.get("manifest_verification") or {}
        lines += ["", f"Export: `llm-export {ex['command'].split('export.cli ', 1)[-1]}`: exit {ex['exit_code']} "
                      f"in {ex['seconds']} s (builder {ex.get('build_seconds')} s); manifest verification: "
                      f"{mv.get('status')} ({mv.get('reason', '')})."]
    v = r.get("verify")
    if v:
        lg, gr = v.get("logits", {}), v.get("greedy", {})
        lines += ["", f"Verification on {'/'.join(v.get('onnx_providers', []))} (export.verify.verify_export, "
                      f"{r.get('precision')} criteria: {v.get('criterion')}): **{v.get('status')}** "
                      f"{('(' + v['reason'] + ')') if v.get('reason') else ''}; max abs logit diff "
                      f"{lg.get('max_abs_diff')} (tolerance {lg.get('tolerance')}, scale {lg.get('logit_scale')}), "
                      f"KL max {lg.get('kl_max')}, top-1 {lg.get('top1_agree')}/{lg.get('prompts')}, greedy "
                      f"agreement {gr.get('agreed')} of {gr.get('tokens')} (required {gr.get('required')}), "
                      f"{v.get('seconds')} s."]
    for key, title in (("engine_nocache", "Engine, prefix cache off"), ("engine", "Engine, exported settings")):
        e = r.get(key)
        if not e:
            continue
        c = e.get("comparison", {})
        lines += ["", f"## {title}", "",
                  f"Load {e.get('load_seconds')} s; decoder {e.get('decoder')}. 16 prompts one at a time "
                  f"{e.get('alone_seconds')} s, all 16 at once {e.get('batch_seconds')} s. Same greedy text alone "
                  f"and in the batch: **{c.get('same_text')} of {c.get('of')}**; log-probs bit for bit equal: "
                  f"{c.get('same_logprobs_bitwise')} of {c.get('of')}; max abs log-prob difference "
                  f"{c.get('max_abs_logprob_diff')}.", "", "| # | prompt | alone | in the batch of 16 | same |",
                  "|---|---|---|---|---|"]
        for i, (a, b) in enumerate(zip(e.get("alone", []), e.get("batch", []))):
            esc = lambda s: (s or "").replace("|", "/").replace("\n", " ")  # noqa: E731
            lines.append(f"| {i} | {esc(PROMPTS[i])} | {esc(a['text'])[:160]} ({a['output_tokens']} tok, "
                         f"{a['finish_reason']}) | "
                         f"{'same' if a['text'] == b['text'] else esc(b['text'])[:160]} | "
                         f"{'yes' if a['text'] == b['text'] else 'NO'} |")
    st = r.get("steps")
    if st:
        lines += ["", "## Decode steps (Decoder.decode, logits back on the host)", "",
                  "| rows | positions | median ms | min ms | p90 ms | tok/s |", "|---|---|---|---|---|---|"]
        for d in st.get("decode", []):
            if "median_ms" in d:
                lines.append(f"| {d['rows']} | {d['length']} | {d['median_ms']} | {d['min_ms']} | {d['p90_ms']} | "
                             f"{d['tokens_per_s']} |")
        for p in st.get("prefill", []):
            lines.append(f"\nPrefill of {p['tokens']} tokens: median {p['median_ms']} ms (min {p['min_ms']}).")
    tp = r.get("throughput")
    if tp:
        lp = "log-probs requested" if tp.get("logprobs", True) else "no log-probs"
        second = tp.get("second_run")
        lines += ["", f"Engine throughput: {tp['concurrency']} requests at once x {tp['max_tokens']} tokens "
                      f"(ignore_eos, {lp}): {tp['output_tokens']} tokens in {tp['seconds']} s = {tp['tok_s']} tok/s"
                      + (f"; the same again on the same engine: {second['tok_s']} tok/s." if second else ".")]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, help="the default model's GGUF (export.default_model.GGUF_MEMBER)")
    p.add_argument("--checkpoint", type=Path, help="a Hugging Face checkpoint directory (skips the GGUF step)")
    p.add_argument("--version-dir", type=Path, help="an existing export's version directory (skips the export)")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-engine-check"))
    p.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "gpu-engine-check")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--deadline", type=float, default=420.0, help="seconds for the whole run")
    p.add_argument("--quick", action="store_true", help="fewer timing repetitions (dry runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(args.deadline))
    run = Run(args.out, args.deadline - 5)
    r = run.r
    r.update({"device": args.device, "precision": args.precision, "model": MODEL_ID, "host": platform.node()})
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        import torch  # noqa: F401  - first: its CUDA libraries are then loaded for onnxruntime too

        r["environment"] = run.stage("environment", environment, args.device)
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = args.work / "checkpoint"
            r["checkpoint"] = run.stage("gguf_to_checkpoint", convert_gguf, args.gguf, ckpt, need_s=30)
        version_dir = args.version_dir
        if version_dir is None and ckpt.exists():
            r["export"] = run.stage("export", run_export, ckpt, args.work / "models", args.precision, 64,
                                    args.out / "export.log", need_s=60)
            if r["export"]:
                version_dir = Path(r["export"]["version_dir"])
        if version_dir is None:
            raise RuntimeError("no export to load")
        if ckpt.exists():
            r["verify"] = run.stage("verify", verify_on_device, ckpt, version_dir, args.precision, args.device,
                                    need_s=40)
        timeout = 120 if args.device == "cuda" else 600
        nc = run.stage("engine_nocache", engine_runs, version_dir, args.device, args.max_tokens, False, timeout,
                       need_s=40)
        engine = None
        if nc:
            r["engine_nocache"], engine = nc
        d = run.stage("engine", engine_runs, version_dir, args.device, args.max_tokens, True, timeout, need_s=40)
        if d:
            r["engine"], engine = d
        if engine is not None:
            reps = 5 if args.quick else 30
            rows = (1, 4) if args.quick else (1, 16, 64)
            lengths = (128,) if args.quick else (128, 1024)
            r["steps"] = run.stage("steps", step_times, engine.core.dec, rows, lengths, reps, need_s=20)
            del engine
        conc = 4 if args.quick else 64
        r["throughput"] = run.stage("throughput", throughput, version_dir, args.device, conc,
                                    16 if args.quick else 128, timeout, need_s=30)
    except Deadline as err:
        r["aborted"] = str(err)
    except Exception as err:  # noqa: BLE001 - recorded
        r["aborted"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        signal.alarm(0)
        run.write()
    print(f"\n[gpu-check] summary ({r['elapsed_s']} s):", flush=True)
    print(render_markdown(r), flush=True)
    failed = [k for k, s in r["stages"].items() if not s.get("ok")]
    return 1 if failed or r.get("aborted") else 0


if __name__ == "__main__":
    sys.exit(main())
