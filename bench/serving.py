"""`make bench`: the whole stack through the OpenAI API against llama.cpp's own server.

In turns in one run, on the same prompts (fixed length, `ignore_eos` so every request
makes exactly `--output-len` tokens, greedy), streaming, clients starting `--stagger`
seconds apart, at each concurrency (level by level, the systems back to back, so that
the machine's drift over minutes falls on both sides of a ratio):

    ours (OpenAI API)   tritonserver + the adapter, as `make serve` runs them
    ours (gRPC)         the model directly over Triton's gRPC stream: the adapter's cost
                        (prompts of its own, made alike: `prompt_plan`)
    llama-server        llama.cpp's C++ server (bench/llama_server.py), its OpenAI API,
                        a fresh server per concurrency with one slot per client,
                        repacking and continuous batching on
    transformers        `generate`, fp32, the same prompts as one batch: the floor

Writes docs/bench-results/serving-<time>.json, .md and a PNG of throughput, time to
first token and inter-token latency (p50, p99) against concurrency, and prints the table
with the ratios.

    python -m bench.serving [--concurrency 1 4 16 64] [--output-len 64] [--rounds 4]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.results import write_run

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench-results"
MODEL = "smollm2-135m-instruct"


def pct(values: list[float], q: float):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


async def openai_stream(http: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int,
                        tok=None) -> dict:
    """One streaming /v1/completions request: arrival times of its text chunks, and with
    the model's tokenizer `tok` the tokens each carried (chunk_tokens). A 429 is retried
    after its Retry-After, as the OpenAI SDKs do (counted in `refused`); time to first
    token counts from the first attempt, as the user waits."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start, times, pieces, error, refused, reconnects = time.perf_counter(), [], [], None, 0, 0
    try:
        while True:
            try:
                stream = await http.send(http.build_request("POST", url + "/v1/completions", json=body), stream=True)
            except (httpx.RemoteProtocolError, httpx.ConnectError):
                # A kept-alive connection the server had closed, before any answer: the
                # OpenAI SDKs retry these (twice by default), so do we.
                if reconnects >= 2:
                    raise
                reconnects += 1
                continue
            async with contextlib.aclosing(stream) as r:
                if r.status_code == 429 and refused < 20:
                    refused += 1
                    await r.aread()
                    await asyncio.sleep(float(r.headers.get("retry-after") or 1))
                    continue
                if r.status_code != 200:
                    return {"error": f"{r.status_code}: {(await r.aread())[:200]!r}", "status": r.status_code,
                            "refused": refused}
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                    elif event.get("choices") and event["choices"][0].get("text"):
                        times.append(time.perf_counter())
                        pieces.append(event["choices"][0]["text"])
                break
    except httpx.HTTPError as err:  # counted, not fatal: the table says how many
        return {"error": f"{type(err).__name__}: {err!r}", "status": "connection", "refused": refused}
    return {"start": start, "times": times, "pieces": pieces, "error": error, "status": 200, "refused": refused,
            "reconnects": reconnects, **({"tokens": chunk_tokens(pieces, tok, output_len)} if tok and pieces else {})}


async def grpc_stream(client, model: str, ids: list[int], output_len: int) -> dict:
    from bench.llm_client import generate
    r = await generate(client, model, input_ids=ids, max_tokens=output_len, ignore_eos=True, temperature=0.0,
                       return_num_output_tokens=True)
    return {"start": r.start, "times": r.times, "tokens": [b - a for a, b in zip([0] + r.counts, r.counts)],
            "error": r.error, "status": 200 if not r.error else 500}


def chunk_tokens(pieces: list[str], tok, total: int) -> list[int]:
    """How many of a request's `total` output tokens each streamed text chunk carried.
    The OpenAI stream does not say: each chunk is tokenized on its own and the counts are
    scaled to add up to `total` (exact under `ignore_eos`), so both servers are counted
    alike; llama-server sends one token a chunk, ours `stream_interval` after the first."""
    counts = [max(1, len(tok.encode(p, add_special_tokens=False).ids)) for p in pieces]
    whole, running, out = sum(counts), 0, []
    for n in counts:
        running += n
        out.append(round(total * running / whole) - sum(out))
    return out


async def load(send, concurrency: int, rounds: int, stagger: float) -> tuple[list[dict], float]:
    """`concurrency` closed-loop clients, each sending `rounds` requests, starts staggered."""
    results: list[dict] = []

    async def client(c: int) -> None:
        await asyncio.sleep(c * stagger)
        for r in range(rounds):
            results.append({**await send(c * rounds + r), "client": c})

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return results, time.perf_counter() - t0


STEADY_NOTE = ("Output tok/s is the whole run's, the staggered start and the tail included; steady tok/s "
               "counts only the window from when every client had finished its first request and sent its "
               "next, to the first client's last token: clients cycling, new requests prefilled beside the "
               "others' decoding (its length in brackets; '-' where there was none, or a request failed). "
               "ITL is the time between text chunks as a client receives them; llama-server sends a chunk per "
               "token, ours one per `stream_interval` tokens after the first (4 by default): output tokens per "
               "chunk in brackets. The steady window counts each chunk's tokens (by the model's tokenizer over "
               "the OpenAI API, by the running counts over gRPC).")


def steady_rate(results: list[dict]) -> tuple[float | None, float]:
    """Output tokens/s in the closed loop's steady state: from the moment every client has
    finished its first request and sent its next, to the first client's last token. New
    requests then arrive, and are prefilled, while others decode, as in perf_analyzer's
    windows at a concurrency (bench.cross_check runs perf_analyzer itself). The first
    round is left out: the window used to start at the last client's first request, at
    the end of the ramp, where nearly every request was decoding at once and none was
    being prefilled; for the faster system it was short (0.5 s at 16 streams) and measured
    decoding more than the steady state. (rate, window seconds); the rate is None for a
    window under 0.3 s, a client with one request, or a failed request. A chunk counts
    its "tokens" where the result has them (one token otherwise)."""
    by_client: dict[int, list[dict]] = {}
    for r in results:
        by_client.setdefault(r.get("client", 0), []).append(r)
    if (not results or any(r.get("error") or not r.get("times") for r in results)
            or any(len(rs) < 2 for rs in by_client.values())):
        return None, 0.0                 # a failed request leaves a hole in the window
    begin = max(sorted(r["start"] for r in rs)[1] for rs in by_client.values())
    end = min(max(r["times"][-1] for r in rs) for rs in by_client.values())
    if end - begin < 0.3:
        return None, max(end - begin, 0.0)
    tokens = sum(n for r in results for t, n in zip(r["times"], r.get("tokens") or [1] * len(r["times"]))
                 if begin < t <= end)
    return tokens / (end - begin), end - begin


def summarize(results: list[dict], elapsed: float, output_len: int) -> dict:
    ok = [r for r in results if not r.get("error") and r.get("times")]
    steady, window = steady_rate(results)
    ttft = [r["times"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    return {"requests": len(results), "errors": len(results) - len(ok),
            # of the errors: requests the client gave up on after 20 refusals (429s, each
            # retried after its Retry-After), starved by the others' retries
            "gave_up_429": sum(1 for r in results if r.get("status") == 429),
            "statuses": sorted({str(r.get("status")) for r in results}),
            "refused_429": sum(r.get("refused", 0) for r in results),
            "reconnects": sum(r.get("reconnects", 0) for r in results),
            "error_samples": sorted({str(r["error"])[:160] for r in results if r.get("error")})[:3],
            "tok_s": round(len(ok) * output_len / elapsed, 1),
            "steady_tok_s": round(steady, 1) if steady else None, "steady_window_s": round(window, 2),
            "ttft_p50_ms": round(pct(ttft, 50) * 1000, 1) if ttft else None,
            "ttft_p99_ms": round(pct(ttft, 99) * 1000, 1) if ttft else None,
            "itl_p50_ms": round(pct(itl, 50) * 1000, 1) if itl else None,
            "itl_p99_ms": round(pct(itl, 99) * 1000, 1) if itl else None,
            "tokens_per_chunk": round(len(ok) * output_len / max(1, sum(len(r["times"]) for r in ok)), 2)}


def prompt_plan(requests: dict[int, int]) -> tuple[dict[int, int], int, int]:
    """Which prompt each request takes, from {concurrency: requests at that level}: the
    first index of each level, the warm-up's index and the shift of the gRPC rows.

    Every request of a system has its own prompt: the levels in turn, then the warm-up;
    llama-server (a fresh server per level) takes the same ones as our API rows. Our gRPC
    rows run after the API rows in the same Triton process, so they take the same plan
    shifted past it: on the API rows' prompts the prompt cache would skip most of their
    prefill (it did, before: gRPC's time to first token looked half the API's)."""
    offsets, n = {}, 0
    for c, count in sorted(requests.items()):
        offsets[c], n = n, n + count
    return offsets, n, n + 1


def prompts_for(tok, n: int, length: int) -> tuple[list[str], list[list[int]]]:
    """n different prompts of exactly `length` tokens (by this tokenizer), as text and ids;
    they differ from their first words, so no prompt cache (ours, llama-server's slots)
    serves one from another."""
    words = ("the river city light garden morning paper window quiet stone music winter road friend story "
             "market yellow ocean teacher summer").split()
    texts, ids = [], []
    for i in range(n):
        rng = random.Random(i)
        text = " ".join(rng.choice(words) for _ in range(length * 2))
        t = tok.encode(text, add_special_tokens=False).ids[:length]
        ids.append(t)
        texts.append(tok.decode(t))
    return texts, ids


def rounds_at(c: int, args) -> int:
    """Requests per client at concurrency c: `--rounds`, more where the level would
    otherwise have fewer than `--min-requests` in all (one stream's 2 requests were 128
    tokens, under a second: its ratio moved by 0.2 between runs)."""
    return max(args.rounds, -(-args.min_requests // c))


@contextlib.contextmanager
def triton_serving(repo: Path, tmp: Path):
    """tritonserver on free ports over the model repository `repo`, stopped on exit."""
    from stack.triton import TritonServer

    tmp.mkdir(parents=True, exist_ok=True)
    triton = TritonServer.on_free_ports(repo, log_path=tmp / "triton.log").start_ready(300)
    try:
        yield triton
    finally:
        triton.stop()


@contextlib.contextmanager
def adapter_over(triton, tmp: Path):
    """The real adapter as a process in front of `triton`, ready; stopped on exit."""
    sys.path.insert(0, str(ROOT / "tests" / "adapter"))
    from adapter_testlib import AdapterProcess

    adapter = AdapterProcess(triton.grpc_url, triton.http_url, tmp / "adapter.log",
                             TRITON_REPOSITORY_KEY=triton.repository_key, ADAPTER_ACCESS_LOG="false",
                             ADAPTER_LOG_LEVEL="warning").start()
    try:
        adapter.wait_ready(120)
        yield adapter
    finally:
        adapter.stop()


def run(args) -> dict:
    from export.default_model import fetch_default_gguf
    from llm_backend.service import load_tokenizer

    from bench.llama_server import BINARY, LlamaServer

    repo = ROOT / "model_repository"
    from stack.default_model import ensure_default_model
    version = ensure_default_model(repo, name=MODEL) / "1"
    tok = load_tokenizer(version)
    levels = sorted(set(args.concurrency))
    offsets, warm_up, grpc_shift = prompt_plan({c: c * rounds_at(c, args) for c in levels})
    texts, ids = prompts_for(tok, 2 * grpc_shift, args.prompt_len)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_average_before": os.getloadavg()}, "systems": {}}

    def measure(name: str, c: int, make_send) -> None:
        """One level of one system: make_send() -> (send, close), called inside the run's
        event loop; the row goes to report["systems"][name]."""
        async def level():
            send, close = make_send()
            try:
                await send(warm_up)
                return await load(lambda i: send(offsets[c] + i), c, rounds_at(c, args), args.stagger)
            finally:
                await close()

        results, elapsed = asyncio.run(level())
        row = {"concurrency": c, **summarize(results, elapsed, args.output_len)}
        report["systems"].setdefault(name, []).append(row)
        print(f"{name:22s} c={c:3d} {row['tok_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_ms']} ms  "
              f"errors {row['errors']} {row['statuses']} 429s {row['refused_429']} {row['error_samples']}",
              flush=True)

    def openai_sender(url: str, model: str):
        http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=max(levels) * 2))

        async def send(i: int) -> dict:
            return await openai_stream(http, url, model, texts[i], args.output_len, tok)
        return send, http.aclose

    def ours(c: int) -> None:
        """Our stack, started for this level and stopped after it: nothing of ours (the
        adapter's health probes generate every second) runs beside llama-server."""
        with triton_serving(repo, tmp / f"stack-{c}") as triton:
            with adapter_over(triton, tmp / f"stack-{c}") as adapter:
                measure("ours, OpenAI API", c, lambda: openai_sender(adapter.url, MODEL))

            def grpc_sender():
                import tritonclient.grpc.aio as grpcclient
                client = grpcclient.InferenceServerClient(triton.grpc_url)

                async def send(i: int) -> dict:
                    return await grpc_stream(client, MODEL, ids[grpc_shift + i], args.output_len)
                return send, client.close
            measure("ours, gRPC", c, grpc_sender)

    def llama(c: int) -> None:
        """A server sized for the level, as its users run it (`LlamaServer.for_clients`)."""
        server = LlamaServer.for_clients(c, args.prompt_len + args.output_len + 64, tmp / f"llama-server-{c}.log")
        report["llama_server"]["commands"].append(
            " ".join(server.command[1:]).replace(str(fetch_default_gguf()), "SmolLM2-135M-Instruct.Q4_1.gguf"))
        try:
            measure("llama-server (C++)", c, lambda: openai_sender(server.url, MODEL))
        finally:
            server.stop()

    if BINARY.exists():
        report["llama_server"] = {"commands": [], "forced_off": "nothing"}
    else:
        report["llama_server"] = {"missing": f"{BINARY} not built: python -m bench.llama_server build"}
    # Level by level, the systems back to back: this machine's speed drifts by 10-15% over
    # minutes, and a ratio is only as good as the two runs being close in time. Which goes
    # first alternates, so that a drift within a level does not always favour one side.
    for i, c in enumerate(levels):
        systems = [ours, llama] if BINARY.exists() else [ours]
        for system in systems if i % 2 == 0 else systems[::-1]:
            try:
                system(c)
            except Exception as err:   # a server that did not start: the other levels still run
                print(f"{system.__name__} at c={c} failed: {err}", file=sys.stderr, flush=True)
                report.setdefault("failures", []).append({"system": system.__name__, "concurrency": c,
                                                          "error": str(err)[:500]})
    if not args.no_transformers:
        report["transformers"] = transformers_floor(ids, levels, args.output_len)
    report["machine"]["load_average_after"] = os.getloadavg()
    return report


def transformers_floor(ids: list[list[int]], levels: list[int], output_len: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from export.default_model import fetch_default_model
    model = AutoModelForCausalLM.from_pretrained(fetch_default_model(), dtype=torch.float32).eval()
    rows = []
    for c in levels:
        batch = torch.tensor(ids[:c])
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=output_len,
                           min_new_tokens=output_len, do_sample=False, pad_token_id=2)
            dt = time.perf_counter() - t0
        rows.append({"concurrency": c, "tok_s": round(c * output_len / dt, 1)})
        print(f"{'transformers fp32':22s} c={c:3d} {rows[-1]['tok_s']:8.1f} tok/s", flush=True)
    return rows


def render(report: dict) -> str:
    llama = {r["concurrency"]: r for r in report["systems"].get("llama-server (C++)", [])}
    floor = {r["concurrency"]: r for r in report.get("transformers", [])}
    lines = ["| system | concurrency | output tok/s | vs llama-server | steady tok/s (window s) | steady vs llama-server "
             "| vs transformers | TTFT p50 / p99 ms | ITL p50 / p99 ms (tokens a chunk) | errors (given up after 20 429s) "
             "| retried: 429 / closed connection |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in report["systems"].items():
        for r in rows:
            c = r["concurrency"]
            vs_l = f"{r['tok_s'] / llama[c]['tok_s']:.3f}x" if c in llama and llama[c]["tok_s"] else ""
            steady = r.get("steady_tok_s")
            vs_ls = (f"{steady / llama[c]['steady_tok_s']:.3f}x"
                     if steady and c in llama and llama[c].get("steady_tok_s") else "")
            vs_t = f"{r['tok_s'] / floor[c]['tok_s']:.3f}x" if c in floor else ""
            steady_cell = f"{steady} ({r['steady_window_s']})" if steady else "-"
            errors = f"{r['errors']} ({r['gave_up_429']})" if r.get("gave_up_429") else f"{r['errors']}"
            lines.append(f"| {name} | {c} | {r['tok_s']} | {vs_l} | {steady_cell} | "
                         f"{vs_ls} | {vs_t} | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} | "
                         f"{r['itl_p50_ms']} / {r['itl_p99_ms']} ({r.get('tokens_per_chunk', '')}) | {errors} | {r.get('refused_429', '')} / {r.get('reconnects', '')} |")
    for r in report.get("transformers", []):
        lines.append(f"| transformers generate fp32, one batch | {r['concurrency']} | {r['tok_s']} | | | | 1.000x | | | | |")
    ls = report.get("llama_server", {})
    lines.append("")
    commands = ls.get("commands") or [ls.get("command", ls.get("missing"))]
    lines.append("llama-server, a fresh one per concurrency: " + "; ".join(f"`{c}`" for c in commands)
                 + f"; forced off: {ls.get('forced_off', '-')}.")
    for f in report.get("failures", []):
        lines.append(f"\n**{f['system']} at concurrency {f['concurrency']} did not run:** {f['error']}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Throughput, time to first token and inter-token latency (p50 and p99) against
    concurrency, one colour per system."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    for name, rows in report["systems"].items():
        cs = [r["concurrency"] for r in rows]
        (line,) = a.plot(cs, [r["tok_s"] for r in rows], marker="o", label=name)
        for ax, metric in ((b, "ttft"), (c, "itl")):
            ax.plot(cs, [r[f"{metric}_p50_ms"] for r in rows], marker="o", color=line.get_color(), label=f"{name} p50")
            ax.plot(cs, [r[f"{metric}_p99_ms"] for r in rows], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{name} p99")
    if report.get("transformers"):
        rows = report["transformers"]
        a.plot([r["concurrency"] for r in rows], [r["tok_s"] for r in rows], marker="s", label="transformers fp32")
    for ax, title, unit in ((a, "aggregate output", "tokens/s"), (b, "time to first token", "ms"),
                            (c, "inter-token latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    a.legend(fontsize=7)
    for ax in (b, c):
        ax.legend(fontsize=6)
        ax.set_yscale("log")
    fig.suptitle(f"bench.serving {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=38)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4,
                    help="requests per client (the steady window leaves out the first)")
    ap.add_argument("--min-requests", type=int, default=16, help="requests per level at least (more rounds at low concurrency)")
    ap.add_argument("--stagger", type=float, default=0.1, help="seconds between client starts")
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    table = render(report)
    print(table)
    base = write_run(OUT, "serving", report,
                     f"# bench.serving {report['date']}\n\n{args.prompt_len} prompt tokens, {args.output_len} output "
                     f"tokens, greedy, streaming, clients staggered by {args.stagger} s, {args.rounds} requests each "
                     f"(at least {args.min_requests} per level in all). {STEADY_NOTE}\n\n{table}\n")
    plot(report, Path(f"{base}.png"))
    print(f"and the plot: {base.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
