"""Validation of a candidate version before it takes traffic, on a live server:

- its answers: the prompts recorded in the version's manifest at export
  (`verification.probes`: the exported model's greedy tokens, EOS ignored) must come
  back as recorded: the served text begins with the recorded prefix (all tokens for
  fp32, the first tokens of a quantized export, as the manifest says);
- its speed: time to first token and decode rate, measured in turns with the serving
  version in the same command, within a bound of the serving version's.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Run:
    text: str = ""
    error: Optional[str] = None
    ttft_s: Optional[float] = None
    decode_tok_s: Optional[float] = None


@dataclass
class Verdict:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


def _inputs(prompt_ids: list[int], max_tokens: int):
    import tritonclient.grpc.aio as grpcclient
    out = []
    for name, arr, kind in (("input_ids", np.array([prompt_ids], dtype=np.int64), "INT64"),
                            ("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
                            ("stream", np.array([[True]]), "BOOL"),
                            ("ignore_eos", np.array([[True]]), "BOOL"),
                            ("return_num_output_tokens", np.array([[True]]), "BOOL")):
        t = grpcclient.InferInput(name, list(arr.shape), kind)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


async def _one(grpc_url: str, model: str, version: int, prompt_ids: list[int], max_tokens: int) -> Run:
    """One greedy request (no temperature: the model decodes greedily) to one version."""
    import tritonclient.grpc.aio as grpcclient
    client = grpcclient.InferenceServerClient(grpc_url)
    run, pieces, times, count = Run(), [], [], 0
    start = time.perf_counter()

    finished = asyncio.Event()

    async def requests():
        yield {"model_name": model, "model_version": str(version), "inputs": _inputs(prompt_ids, max_tokens),
               "parameters": {"triton_enable_empty_final_response": True}}
        # Keep our half of the stream open until the final response: a stream closed
        # early leaves Triton 2.51 holding the request, and the version never unloads.
        await finished.wait()

    try:
        async for result, error in client.stream_infer(inputs_iterator=requests()):
            if error is not None:
                run.error = str(error.message() if hasattr(error, "message") else error)
                break
            text = result.as_numpy("text_output")
            if text is not None:
                pieces.append(text.reshape(-1)[0].decode("utf-8", "replace"))
                times.append(time.perf_counter())
            n = result.as_numpy("num_output_tokens")
            if n is not None:
                count = int(n.reshape(-1)[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        finished.set()
        await client.close()
    run.text = "".join(pieces)
    if times:
        run.ttft_s = times[0] - start
        if count > 1 and times[-1] > times[0]:
            run.decode_tok_s = (count - 1) / (times[-1] - times[0])
    return run


def run_probe(grpc_url: str, model: str, version: int, prompt_ids: list[int], max_tokens: int) -> Run:
    return asyncio.run(_one(grpc_url, model, version, prompt_ids, max_tokens))


def check_answers(grpc_url: str, model: str, version: int, probes: dict) -> list[str]:
    """Mismatches of the recorded answers (empty: all came back as recorded)."""
    problems = []
    for i, case in enumerate(probes["cases"]):
        run = run_probe(grpc_url, model, version, case["prompt_ids"], probes["max_tokens"])
        if run.error:
            problems.append(f"probe {i}: the model failed: {run.error}")
        elif not run.text.startswith(case["expected_prefix"]):
            problems.append(f"probe {i}: expected the answer to begin {case['expected_prefix'][:60]!r}, "
                            f"got {run.text[:60]!r} (first {probes['match_tokens']} tokens must agree)")
    return problems


def compare_speed(grpc_url: str, model: str, serving: int, candidate: int, probes: dict, turns: int,
                  max_slowdown: float) -> tuple[list[str], dict]:
    """Time to first token and decode rate of both versions, in turns (ABAB: the machine's
    moods hit both); the candidate may be at most `max_slowdown` (0.5 = 50%) worse."""
    case = max(probes["cases"], key=lambda c: len(c["prompt_ids"]))
    tokens = max(probes["max_tokens"], 16)
    samples: dict[int, list[Run]] = {serving: [], candidate: []}
    run_probe(grpc_url, model, candidate, case["prompt_ids"], 2)  # warm-up of a fresh version
    for _ in range(turns):
        for v in (serving, candidate):
            samples[v].append(run_probe(grpc_url, model, v, case["prompt_ids"], tokens))
    figures, problems = {}, []
    for v, runs in samples.items():
        ttfts = [r.ttft_s for r in runs if r.ttft_s is not None]
        rates = [r.decode_tok_s for r in runs if r.decode_tok_s is not None]
        figures[v] = {"ttft_ms": round(statistics.median(ttfts) * 1000, 2) if ttfts else None,
                      "decode_tok_s": round(statistics.median(rates), 1) if rates else None}
    s, c = figures[serving], figures[candidate]
    if None in (s["ttft_ms"], c["ttft_ms"], s["decode_tok_s"], c["decode_tok_s"]):
        problems.append("could not measure both versions' speed")
        return problems, figures
    if c["ttft_ms"] > s["ttft_ms"] * (1 + max_slowdown):
        problems.append(f"time to first token {c['ttft_ms']} ms against {s['ttft_ms']} ms of version {serving} "
                        f"(allowed: {1 + max_slowdown:.2f}x)")
    if c["decode_tok_s"] < s["decode_tok_s"] / (1 + max_slowdown):
        problems.append(f"decode rate {c['decode_tok_s']} tok/s against {s['decode_tok_s']} tok/s of version "
                        f"{serving} (allowed: 1/{1 + max_slowdown:.2f})")
    return problems, figures
