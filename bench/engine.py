"""Benchmark of the `llm` model in a real tritonserver against transformers `generate`.

    python -m bench.engine [--precision w8a8 int4] [--concurrency 1 4 16 64]

For each export precision it starts tritonserver on the default model, drives it over
gRPC streams (bench/llm_client.py, async) at each concurrency with fixed prompt and
output lengths (distinct prompts of --prompt-len tokens sent as input_ids, greedy,
ignore_eos, --output-len new tokens), clients starting staggered, each sending --rounds
requests one after the other (closed loop, like perf_analyzer's concurrency mode), and measures:
aggregate output tokens/s, time to first token p50/p99, inter-token latency p50/p99.
It also measures time to first token of a new ~100-token prompt at one stream and of
the same prompt again (prefix cache). In the same run it measures transformers
`generate` (fp32, the same prompts batched at each concurrency) as the baseline, and,
when `make llama-venv` has built it, llama.cpp on the model's original Q4_1 GGUF at one
stream (bench/llamacpp.py), taking turns with the engines' one-stream runs.
Writes bench/results/engine-<time>.json and .md and prints the table.

Not a test: times on a shared 2-core machine are noisy; compare ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import write_run

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
MODEL = "smollm2-135m-instruct"
ONE_STREAM_TURNS = 3   # turns of the one-stream comparison with llama.cpp

TOPICS = ["the ocean", "a lighthouse keeper", "mountain weather", "ancient Rome", "a robot painter",
          "coffee farming", "the moon landing", "a jazz club", "desert plants", "a chess prodigy",
          "volcanoes", "a night train", "honeybees", "the printing press", "arctic foxes", "a bakery",
          "glaciers", "a space station", "medieval castles", "rainforests", "a violin maker",
          "tidal pools", "city buses", "a marathon"]


def make_prompts(tok, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` tokens (no shared prefix: no cache hits)."""
    filler = (" Describe its history, the people involved, the sounds and colours, and what a visitor "
              "would notice first, then explain why it matters today in a few careful sentences.") * 4
    out = []
    for i in range(n):
        ids = tok.encode(f"Request {i}: write about {TOPICS[i % len(TOPICS)]}.{filler}",
                         add_special_tokens=False).ids[:length]
        out.append(ids)
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


async def drive(url: str, model: str, prompts: list[list[int]], concurrency: int, requests: int,
                output_len: int, stagger: float) -> tuple[list, float]:
    """(results, seconds): `requests` requests from `concurrency` closed-loop clients."""
    import tritonclient.grpc.aio as grpcclient

    from bench.llm_client import generate

    client = grpcclient.InferenceServerClient(url)
    queue = list(range(requests))
    results = []

    async def worker(w: int):
        await asyncio.sleep(w * stagger)               # arrivals staggered
        while queue:
            i = queue.pop(0)
            r = await generate(client, model, input_ids=prompts[i], max_tokens=output_len,
                               ignore_eos=True, temperature=0.0)
            if r.error:
                raise RuntimeError(r.error)
            results.append(r)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await client.close()
    return results, elapsed


def summarize(results: list, elapsed: float, concurrency: int) -> dict:
    tokens = sum(r.num_output_tokens for r in results)
    ttft = [r.ttft for r in results if r.ttft is not None]
    itl = [b - a for r in results for a, b in zip(r.times, r.times[1:])]
    # Tokens, not responses: a token with no text of its own (a special token under
    # ignore_eos, part of a character) rides in the next response. llama.cpp's rate
    # below is counted the same way: tokens after the first over the time they took.
    spans = [(r.num_output_tokens - 1, r.finished_at - r.times[0]) for r in results
             if r.times and r.finished_at and r.num_output_tokens > 1]
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens,
            "seconds": round(elapsed, 3), "tok_s": round(tokens / elapsed, 1), **latencies(ttft, itl),
            "decode_tok_s": round(sum(n for n, _ in spans) / sum(t for _, t in spans), 1) if spans else None}


def latencies(ttft: list[float], itl: list[float]) -> dict:
    """p50/p99 of time to first token and inter-token latency (seconds in, ms out)."""
    return {f"{name}_p{q}_ms": round(pct(values, q) * 1000, 1)
            for name, values in (("ttft", ttft), ("itl", itl)) for q in (50, 99)}


class LlamaCpp:
    """llama.cpp (llama-cpp-python, its own venv) on the default model's Q4_1 GGUF, one
    stream: the single-stream baseline. Runs bench/llamacpp.py in a subprocess."""

    def __init__(self, python: Path, threads: int):
        from export.default_model import fetch_default_gguf

        self.python, self.threads, self.gguf = python, threads, fetch_default_gguf()

    def runs(self, prompts: list[list[int]], output_len: int) -> tuple[str, list[dict]]:
        """(engine description, one timing record per prompt)."""
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(prompts, f)
            f.flush()
            proc = subprocess.run([str(self.python), str(REPO_ROOT / "bench" / "llamacpp.py"), str(self.gguf),
                                   f.name, str(output_len), str(self.threads)],
                                  capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp baseline failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return f"llama-cpp-python {out['llama_cpp_python']}, Q4_1 GGUF, {out['threads']} threads", out["runs"]

    @staticmethod
    def summarize(engine: str, runs: list[dict]) -> dict:
        itl = [x / 1000 for r in runs for x in r["itl_ms"]]
        ttft = [r["ttft_ms"] / 1000 for r in runs]
        return {"engine": engine, "concurrency": 1, "requests": len(runs),
                "tok_s": round(sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs), 1),
                **latencies(ttft, itl), "decode_tok_s": round(len(itl) / sum(itl), 1)}


async def prefix_probe(url: str, model: str, tok) -> dict:
    """TTFT of a new ~100-token prompt at one stream, then of the same prompt again."""
    import tritonclient.grpc.aio as grpcclient

    from bench.llm_client import generate

    client = grpcclient.InferenceServerClient(url)
    system = ("You are a meticulous assistant for a shipping company. Answer in two sentences, cite the "
              "relevant policy section, never invent tracking numbers, and ask for the order id when it "
              "is missing. Policies: returns within 30 days; refunds in 5 business days; damaged goods "
              "are replaced free of charge; international orders pay customs on delivery. ")
    out = {}
    for label in ("new_prompt", "cached_prefix"):
        ttfts = []
        for k in range(3):
            # each repetition: a new prompt for "new_prompt", the same one for "cached_prefix"
            text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nOrder {k if label == 'new_prompt' else 0} question"
            prefix = f"Case {time.monotonic_ns()}: " if label == "new_prompt" else ""
            ids = tok.encode(prefix + text, add_special_tokens=False).ids
            r = await generate(client, model, input_ids=ids, max_tokens=2, temperature=0.0)
            if r.error:
                raise RuntimeError(r.error)
            ttfts.append(r.ttft)
        out[label] = {"prompt_tokens": len(ids), "ttft_ms": round(statistics.median(ttfts) * 1000, 1)}
    await client.close()
    return out


class Baseline:
    """transformers generate, fp32, greedy, the same prompts batched (equal lengths: no padding)."""

    def __init__(self, threads: int):
        self.threads = sorted({threads, 1}, reverse=True)
        import torch
        from transformers import AutoModelForCausalLM

        from export.default_model import fetch_default_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(fetch_default_model(), dtype=torch.float32).eval()

    def warm_up(self, prompts) -> None:
        self.run(prompts[:4], 8)

    def run(self, prompts: list[list[int]], output_len: int) -> dict:
        """The best of the configured and of one torch thread: with other work on the
        machine, torch's OpenMP spin barriers at 2 threads were up to 10x slower."""
        torch = self.torch
        ids = torch.tensor(prompts)
        best = None
        for threads in self.threads:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                t0 = time.perf_counter()
                self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                    min_new_tokens=output_len, do_sample=False, pad_token_id=2)
                dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, threads)
        dt, threads = best
        return {"seconds": round(dt, 3), "tok_s": round(len(prompts) * output_len / dt, 1), "torch_threads": threads}


def build_repository(repo: Path, precisions: list[str], levels: list[int], threads: int) -> dict[str, str]:
    """One repository serving each precision under its own model name."""
    from llm_backend.model_config import EngineParams, render_config_pbtxt
    from stack.default_model import ensure_default_model

    names = {}
    settings = dict(max_num_seqs=max(levels), max_model_len=512, max_queue_size=256, intra_op_threads=threads)
    for i, prec in enumerate(precisions):
        name = MODEL if i == 0 else f"{MODEL}-{prec}"
        if i == 0:
            ensure_default_model(repo, precision=prec, **settings)
        else:
            src = ensure_default_model(repo.parent / f"src-{prec}", precision=prec) / "1"
            (repo / name / "1").mkdir(parents=True)
            for f in src.iterdir():
                os.link(f, repo / name / "1" / f.name) if not f.is_symlink() else (repo / name / "1" / f.name).symlink_to(f.resolve())
            (repo / name / "config.pbtxt").write_text(render_config_pbtxt(name, EngineParams(precision=prec, **settings)))
        names[prec] = name
    return names


def measure_all(args, prompts, levels, tok) -> dict:
    """Both engines in one server; per concurrency level each engine, then the baselines,
    back to back, so the ratios compare the same minute of this shared machine."""
    from stack.triton import TritonServer

    report = {"engines": {p: {"levels": []} for p in args.precision}, "baseline": {}}
    fresh = iter(range(len(prompts)))

    def take(n: int) -> list[list[int]]:
        """Prompts no engine has seen: no prefix-cache hits inside the measurement."""
        return [prompts[next(fresh)] for _ in range(n)]

    base = None if args.no_baseline else Baseline(args.threads)
    llama = LlamaCpp(args.llamacpp_python, args.threads) if args.llamacpp_python else None
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        repo = Path(tmp) / "repo"
        names = build_repository(repo, args.precision, levels, args.threads)
        RESULTS.mkdir(parents=True, exist_ok=True)
        log = RESULTS / "tritonserver.log"
        log.write_text("")
        with TritonServer.on_free_ports(repo, log_path=log) as srv:
            def engine_level(prec, c, n, out_len, stagger):
                return asyncio.run(drive(srv.grpc_url, names[prec], take(n), c, n, out_len, stagger))

            for prec in args.precision:                  # warm-up: page in weights, allocate
                engine_level(prec, 2, 2, 8, 0.0)
            if base:
                base.warm_up(prompts)
            for c in levels:
                n = args.rounds * c if c <= 16 else c      # closed loop: each client sends `rounds` requests
                # One stream against llama.cpp: in ONE_STREAM_TURNS turns, each engine and
                # llama.cpp by turns, so that both sample the same minutes of this machine.
                turns = ONE_STREAM_TURNS if c == 1 and llama else 1
                raw = {prec: ([], 0.0) for prec in args.precision}
                llama_runs, llama_engine = [], ""
                for _turn in range(turns):
                    for prec in args.precision:
                        results, seconds = engine_level(prec, c, n, args.output_len, args.stagger)
                        raw[prec] = (raw[prec][0] + results, raw[prec][1] + seconds)
                    if c == 1 and llama:
                        llama_engine, runs = llama.runs(take(args.rounds), args.output_len)
                        llama_runs += runs
                for prec in args.precision:
                    row = summarize(*raw[prec], c)
                    report["engines"][prec]["levels"].append(row)
                    print(f"  llm backend {prec} c={c}: {row['tok_s']} tok/s, TTFT p50 {row['ttft_p50_ms']} ms, "
                          f"ITL p50 {row['itl_p50_ms']} ms", flush=True)
                if llama_runs:
                    report["llama_cpp"] = b = LlamaCpp.summarize(llama_engine, llama_runs)
                    print(f"  llama.cpp c=1: {b['tok_s']} tok/s, decode {b['decode_tok_s']} tok/s, "
                          f"ITL p50 {b['itl_p50_ms']} ms", flush=True)
                if base and c <= 16:
                    report["baseline"][str(c)] = b = base.run(prompts[:c], args.output_len)
                    print(f"  transformers batch {c}: {b['tok_s']} tok/s", flush=True)
            for prec in args.precision:
                report["engines"][prec]["prefix"] = asyncio.run(prefix_probe(srv.grpc_url, names[prec], tok))
    return report


def render(report: dict) -> str:
    # Our responses carry `stream_interval` tokens after the first (4 by default), llama.cpp's
    # one token each: the gap between responses is not the same measure on both sides.
    lines = ["| engine | concurrency | output tok/s | vs transformers | TTFT p50 / p99 ms "
             "| gap between responses p50 / p99 ms |", "|---|---|---|---|---|---|"]
    base = report["baseline"]
    for c, b in base.items():
        lines.append(f"| transformers generate fp32, batch of {c} | {c} | {b['tok_s']} | 1.00x | | |")
    for prec, res in report["engines"].items():
        for row in res["levels"]:
            b = base.get(str(row["concurrency"])) or base.get(row["concurrency"])
            ratio = f"{row['tok_s'] / b['tok_s']:.3f}x" if b else ""   # 3 decimals: 1.498 is not 1.50
            lines.append(f"| llm backend {prec} | {row['concurrency']} | {row['tok_s']} | {ratio} | "
                         f"{row['ttft_p50_ms']} / {row['ttft_p99_ms']} | {row['itl_p50_ms']} / {row['itl_p99_ms']} |")
    llama = report.get("llama_cpp")
    if llama:
        lines += ["", "One stream against llama.cpp (decode rate: tokens after the first / the time they took):", "",
                  "| engine | output tok/s | decode tok/s | vs llama.cpp decode | TTFT p50 ms "
                  "| gap between responses p50 / p99 ms (ours: a response per `stream_interval` tokens) |",
                  "|---|---|---|---|---|---|",
                  f"| {llama['engine']} | {llama['tok_s']} | {llama['decode_tok_s']} | 1.00x | "
                  f"{llama['ttft_p50_ms']} | {llama['itl_p50_ms']} / {llama['itl_p99_ms']} |"]
        for prec, res in report["engines"].items():
            for row in res["levels"]:
                if row["concurrency"] == 1 and row.get("decode_tok_s"):
                    lines.append(f"| llm backend {prec} | {row['tok_s']} | {row['decode_tok_s']} | "
                                 f"{row['decode_tok_s'] / llama['decode_tok_s']:.3f}x | {row['ttft_p50_ms']} | "
                                 f"{row['itl_p50_ms']} / {row['itl_p99_ms']} |")
    lines.append("")
    lines.append("| engine | new prompt: tokens, TTFT ms | repeated prefix (prompt cache): TTFT ms |")
    lines.append("|---|---|---|")
    for prec, res in report["engines"].items():
        p = res["prefix"]
        lines.append(f"| llm backend {prec} | {p['new_prompt']['prompt_tokens']}, {p['new_prompt']['ttft_ms']} | "
                     f"{p['cached_prefix']['ttft_ms']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from stack.default_model import DEFAULT_PRECISION

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", nargs="+", default=list(dict.fromkeys([DEFAULT_PRECISION, "int4"])),
                    choices=["w8a8", "int4", "fp32", "int8"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=38)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--stagger", type=float, default=0.1, help="seconds between client starts")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client (concurrency <= 16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-baseline", action="store_true")
    default_llama = REPO_ROOT / ".cache" / "llama-venv" / "bin" / "python"
    ap.add_argument("--llamacpp-python", type=Path, default=default_llama if default_llama.exists() else None,
                    help="python of a venv with llama-cpp-python (make llama-venv; default: "
                         ".cache/llama-venv if present, else no llama.cpp baseline)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = sorted(set(args.concurrency))

    from llm_backend.service import load_tokenizer
    from stack.default_model import ensure_default_model

    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(ensure_default_model(Path(tmp), precision=args.precision[0]) / "1")
    prompts = make_prompts(tok, 4 * len(args.precision) * (sum(levels) * max(args.rounds, 1) + 4), args.prompt_len)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": {"cpus": os.cpu_count(),
              "platform": platform.platform(), "python": sys.version.split()[0],
              "load_average_before": os.getloadavg()}, "settings": vars(args)}
    report.update(measure_all(args, prompts, levels, tok))
    report["machine"]["load_average_after"] = os.getloadavg()
    table = render(report)
    print(table)
    write_run(RESULTS, "engine", report,
              f"# bench.engine {report['date']}\n\n{args.prompt_len} prompt tokens, {args.output_len} output tokens, "
              f"greedy, {args.threads} threads, clients staggered by {args.stagger}s.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
