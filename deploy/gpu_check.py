"""The GPU check: export the default model for the GPU, start tritonserver and the adapter
on it, run a fixed prompt set and a short load, print time to first token, inter-token
latency and aggregate throughput. About 5 minutes; stops itself after 10.

    python deploy/gpu_check.py [--precision fp16] [--streams 32] [--tokens 128] [--out DIR]

Run it on a machine with an NVIDIA GPU (driver for CUDA 13), from a checkout whose
environment has the serving-gpu packages (deploy/requirements/serving-gpu.txt: the
CUDA builds of onnxruntime and torch) beside the development ones, e.g. in the `triton`
image with the checkout mounted, or a Python 3.12 venv:
    pip install --no-deps --require-hashes -r deploy/requirements/serving-gpu.txt
    pip install -r requirements.lock  (minus onnxruntime and torch) && pip install --no-deps -e .
It refuses to start without a CUDA device. The figures go to OUT/gpu-check-<time>.json.
`--device cpu` runs the same flow on the CPU's default export (cached), as a dry run: the
test suite runs it so that the script works before a GPU is at hand (its first run on a
GPU failed on a missing setting that nothing had run before).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain what a GPU is in one sentence.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
]
DEADLINE_S = 600


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def _stream(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}]}
    start = time.perf_counter()
    times, text, usage = [], [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    times.append(time.perf_counter())
                    text.append(piece)
    return {"ttft": times[0] - start if times else None,
            "itl": [b - a for a, b in zip(times, times[1:])],   # between chunks: stream_interval tokens each
            "tokens": (usage or {}).get("completion_tokens", len(times)), "text": "".join(text),
            "elapsed": time.perf_counter() - start}


async def _measure(url: str, model: str, streams: int, tokens: int) -> dict:
    import httpx
    async with httpx.AsyncClient() as client:
        answers = [await _stream(client, url, model, p, 32) for p in PROMPTS]
        for p, a in zip(PROMPTS, answers):
            print(f"  {p!r} -> {a['text'].strip()[:70]!r}")
        start = time.perf_counter()
        load = await asyncio.gather(*(_stream(client, url, model, PROMPTS[i % len(PROMPTS)], tokens)
                                      for i in range(streams)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in load if r["ttft"] is not None]
    itl = [x for r in load for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in load)
    return {"streams": streams, "max_tokens": tokens, "wall_s": wall, "output_tokens": out_tokens,
            "throughput_tok_s": out_tokens / wall, "ttft_p50_ms": 1000 * _pct(ttft, 0.5),
            "ttft_p99_ms": 1000 * _pct(ttft, 0.99), "itl_p50_ms": 1000 * _pct(itl, 0.5),
            "itl_p99_ms": 1000 * _pct(itl, 0.99), "itl_mean_ms": 1000 * statistics.fmean(itl) if itl else None,
            "single_stream_ttft_ms": [1000 * a["ttft"] for a in answers if a["ttft"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp16", choices=["fp16", "int4", "fp32"])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "build")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of the same flow on the CPU's default export")
    args = p.parse_args(argv)
    signal.alarm(DEADLINE_S)   # the whole check, whatever hangs
    from export.default_model import MODEL_ID, fetch_default_model
    from stack.ports import free_port
    from stack.triton import TritonServer

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    t0 = time.monotonic()
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device: this check needs an NVIDIA GPU (--device cpu: a dry run)", file=sys.stderr)
            return 2
        device_name = torch.cuda.get_device_name(0)
        ckpt = fetch_default_model()
        subprocess.run([sys.executable, "-m", "export.cli", str(ckpt), "--name", MODEL_ID, "--repository",
                        str(tmp / "models"), "--precision", args.precision, "--device", "cuda", "--max-num-seqs",
                        str(max(args.streams, 8)), "--quiet"], check=True)
    else:
        from stack.default_model import DEFAULT_PRECISION, ensure_default_model
        device_name, args.precision = "none: a dry run on the CPU", DEFAULT_PRECISION
        ensure_default_model(tmp / "models", max_num_seqs=max(args.streams, 8))
    export_s = time.monotonic() - t0
    server = TritonServer.on_free_ports(tmp / "models", log_path=tmp / "triton.log")
    port = free_port()
    # The adapter reads Triton's repository index, which tritonserver (stack/triton.py)
    # answers only with this server's key: without it the circuit never closed (the
    # first run on a GPU, docs/bench-results/gpu-engine-20261130.md).
    env = dict(os.environ, ADAPTER_HOST="127.0.0.1", ADAPTER_PORT=str(port), ADAPTER_DATABASE_URL="",
               TRITON_GRPC_URLS=server.grpc_url, TRITON_HTTP_URLS=server.http_url,
               TRITON_REPOSITORY_KEY=server.repository_key)
    adapter = None
    try:
        t1 = time.monotonic()
        server.start_ready(300)
        load_s = time.monotonic() - t1
        adapter = subprocess.Popen([sys.executable, "-m", "openai_adapter.main"], env=env,
                                   stdout=open(tmp / "adapter.log", "ab"), stderr=subprocess.STDOUT)
        import httpx
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"adapter not ready; see {tmp / 'adapter.log'}")
        print(f"GPU: {device_name}; export {export_s:.0f} s, load {load_s:.0f} s; prompts:")
        result = asyncio.run(_measure(url, MODEL_ID, args.streams, args.tokens))
    finally:
        if adapter is not None:
            adapter.terminate()
            adapter.wait(30)
        server.stop()
    result.update({"gpu": device_name, "device": args.device, "precision": args.precision, "model": MODEL_ID,
                   "export_s": export_s, "load_s": load_s, "date": time.strftime("%Y-%m-%d %H:%M")})
    print(f"{args.streams} streams x {args.tokens} tokens: {result['throughput_tok_s']:.1f} tok/s aggregate; "
          f"TTFT p50/p99 {result['ttft_p50_ms']:.1f}/{result['ttft_p99_ms']:.1f} ms; "
          f"gap between chunks (stream_interval tokens) p50/p99 "
          f"{result['itl_p50_ms']:.1f}/{result['itl_p99_ms']:.1f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
