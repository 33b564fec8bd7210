"""The `llm` model in a real tritonserver (CPU), driven over gRPC streams.

One server per module serves five models: the default model in fp32 (parity with
transformers), its W8A8 export (the default precision; int4 on a CPU without VNNI) with
16 slots, its int4 export (a second, prefill session), a copy of the default with one
slot and a one-place queue (capacity), and a model whose ONNX file is corrupt (must fail
to load, clearly, and not be ready).
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc.aio as grpcclient

from bench.llm_client import generate
from llm_backend.model_config import EngineParams, render_config_pbtxt
from stack.default_model import DEFAULT_PRECISION, ensure_default_model
from stack.triton import TritonServer

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
SMALL = "smollm-one-slot"
W8A8 = "smollm-w8a8"     # DEFAULT_PRECISION: w8a8 where the CPU has VNNI
INT4 = "smollm-int4"
w8a8_only = pytest.mark.skipif(DEFAULT_PRECISION != "w8a8", reason="no VNNI on this CPU: no W8A8 model")
BROKEN = "smollm-broken"


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [chat("What is the capital of France?"), "Once upon a time, in a small village,",
           "def fibonacci(n):", chat("Name three primary colors.")]


def _link_version(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f.resolve())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend-e2e")
    repo = root / "repo"
    # fp32 and int4 stream every token (the tests of hold-back and pace count pieces);
    # the default-precision model keeps the default stream interval.
    ensure_default_model(repo, precision="fp32", max_model_len=512, max_num_seqs=16, max_queue_size=64,
                         stream_interval=1)
    default = ensure_default_model(root / "default", precision=DEFAULT_PRECISION) / "1"
    int4 = ensure_default_model(root / "int4", precision="int4") / "1"
    for name, version, params in (
            (W8A8, default, dict(precision=DEFAULT_PRECISION, max_num_seqs=16, max_queue_size=64, max_model_len=512)),
            (INT4, int4, dict(precision="int4", max_num_seqs=16, max_queue_size=64, max_model_len=512,
                              stream_interval=1)),
            (SMALL, default, dict(precision=DEFAULT_PRECISION, max_num_seqs=1, max_queue_size=1, max_model_len=256))):
        _link_version(version, repo / name / "1")
        (repo / name / "config.pbtxt").write_text(render_config_pbtxt(name, EngineParams(**params)))
    broken = repo / BROKEN / "1"
    broken.mkdir(parents=True)
    for f in default.iterdir():
        if f.name.startswith("model.onnx"):
            (broken / f.name).write_bytes(b"not an onnx model")
        else:
            (broken / f.name).symlink_to(f.resolve())
    (repo / BROKEN / "config.pbtxt").write_text(render_config_pbtxt(BROKEN, EngineParams()))
    log = root / "tritonserver.log"
    srv = TritonServer.on_free_ports(repo, log_path=log,
                                     extra_args=["--exit-on-error=false", "--strict-readiness=false"])
    with srv:
        yield srv
        if srv.proc.poll() is not None:
            pytest.fail(f"tritonserver died:\n{srv.log_tail()}")
    # every request was released (cancelled ones too), so the models unloaded cleanly
    assert "Exit timeout expired" not in log.read_text(errors="replace"), srv.log_tail()


@pytest.fixture
async def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    await c.close()


@pytest.fixture(scope="module")
def hf_greedy():
    """transformers greedy continuations of PROMPTS (24 new tokens), as text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(__file__).resolve().parents[2] / ".cache" / "models" / MODEL
    if not ckpt.exists():
        from export.default_model import fetch_default_model
        ckpt = fetch_default_model()
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
            out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def metric(server, name: str, model: str = MODEL) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', body, re.M)
    assert m, f"{name} not on the metrics port"
    return float(m.group(1))


async def test_greedy_matches_transformers(client, hf_greedy):
    for prompt, expected in zip(PROMPTS, hf_greedy):
        streamed = await generate(client, MODEL, prompt, max_tokens=24)
        whole = await generate(client, MODEL, prompt, max_tokens=24, stream=False)
        assert streamed.error is None and streamed.text == expected
        assert whole.responses == 1 and whole.text == expected
        assert streamed.finish_reason in ("stop", "length") and streamed.num_input_tokens > 0


async def test_the_default_stream_interval_groups_tokens_after_the_first(client):
    from llm_backend.model_config import EngineParams

    n = EngineParams().stream_interval
    assert n > 1
    streamed = await generate(client, W8A8, PROMPTS[1], max_tokens=4 * n + 2, ignore_eos=True)
    whole = await generate(client, W8A8, PROMPTS[1], max_tokens=4 * n + 2, ignore_eos=True, stream=False)
    assert streamed.error is None and streamed.text == whole.text
    # the first token at once, then n at a time (fewer where a piece was held MAX_HOLD_S)
    gaps = [b - a for a, b in zip(streamed.counts, streamed.counts[1:])]
    assert streamed.counts[0] == 1 and all(1 <= g <= n for g in gaps) and n in gaps, streamed.counts
    assert streamed.num_output_tokens == 4 * n + 2 and streamed.finish_reason == "length"


@pytest.mark.parametrize("model", [MODEL, pytest.param(W8A8, marks=w8a8_only)])
async def test_sixteen_concurrent_streams_equal_one_at_a_time(client, model):
    prompts = [PROMPTS[i % 4] + (" " * (i // 4)) for i in range(16)]   # 16 distinct prompts
    alone = [(await generate(client, model, p, max_tokens=20)).text for p in prompts]

    async def late(i, p):
        await asyncio.sleep(0.05 * i)                                 # arrivals staggered
        return await generate(client, model, p, max_tokens=20)

    together = await asyncio.gather(*(late(i, p) for i, p in enumerate(prompts)))
    assert [r.error for r in together] == [None] * 16
    assert [r.text for r in together] == alone
    assert len(set(alone)) > 4                                       # real, distinct answers


async def test_int4_streams_under_load_start_alike_and_finish(client):
    """int4 with blocks of 64 (the default int4 export) is not batch-invariant: onnxruntime
    sums a one-row product in another order than a batch (export/int4_requant.py), so
    greedy text may part at a near tie. What holds: the first token comes from the
    prompt's own prefill, whatever else runs, and every stream finishes."""
    prompts = [PROMPTS[i % 4] + (" " * (i // 4)) for i in range(16)]
    alone = [await generate(client, INT4, p, max_tokens=20) for p in prompts]

    async def late(i, p):
        await asyncio.sleep(0.05 * i)
        return await generate(client, INT4, p, max_tokens=20)

    together = await asyncio.gather(*(late(i, p) for i, p in enumerate(prompts)))
    assert [r.error for r in together] == [None] * 16
    assert [r.pieces[0] for r in together] == [r.pieces[0] for r in alone]
    assert all(r.final and r.finish_reason in ("stop", "length") and 0 <= r.num_output_tokens <= 20
               for r in together + alone)


@w8a8_only
async def test_w8a8_sampled_streams_with_a_seed_repeat_under_load(client):
    """Same seed, same text, whether the request runs alone or beside 7 others."""
    prompt = PROMPTS[1]
    alone = await generate(client, W8A8, prompt, max_tokens=24, temperature=0.9, seed=7)
    others = [generate(client, W8A8, PROMPTS[i % 4], max_tokens=24, temperature=0.9, seed=100 + i)
              for i in range(7)]
    loaded, *_ = await asyncio.gather(generate(client, W8A8, prompt, max_tokens=24, temperature=0.9, seed=7),
                                      *others)
    assert alone.error is None and loaded.text == alone.text


async def test_stop_sequence_is_cut_and_not_returned(client):
    free = await generate(client, MODEL, PROMPTS[0], max_tokens=20)
    assert "Paris" in free.text
    r = await generate(client, MODEL, PROMPTS[0], max_tokens=20, stop_words=["Paris", "zzz"])
    assert r.finish_reason == "stop" and r.text == free.text[:free.text.index("Paris")]
    assert not any("Par" in p for p in r.pieces)
    r = await generate(client, MODEL, PROMPTS[0], max_tokens=20, stop_words=["of Fr"], stream=False)
    assert r.text == free.text[:free.text.index("of Fr")] and r.finish_reason == "stop"


async def test_max_tokens_gives_length(client):
    r = await generate(client, MODEL, PROMPTS[1], max_tokens=7)
    assert r.finish_reason == "length" and r.num_output_tokens == 7
    assert r.responses == len(r.pieces) + 1                             # pieces, then the empty final


async def test_log_probs_one_per_output_token(client):
    r = await generate(client, MODEL, PROMPTS[0], max_tokens=12, return_log_probs=True, stream=False)
    assert len(r.logprobs) == r.num_output_tokens and all(lp <= 0 for lp in r.logprobs)
    s = await generate(client, MODEL, PROMPTS[0], max_tokens=12, return_log_probs=True)
    assert s.logprobs == pytest.approx(r.logprobs, abs=1e-4)


async def test_same_seed_same_output(client):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95)
    a = await generate(client, MODEL, PROMPTS[1], seed=1234, **kw)
    b = await generate(client, MODEL, PROMPTS[1], random_seed=1234, **kw)
    c = await generate(client, MODEL, PROMPTS[1], seed=99, **kw)
    assert a.text == b.text and a.text != c.text


async def test_context_overflow_is_invalid_with_both_numbers(client):
    r = await generate(client, MODEL, PROMPTS[0], max_tokens=600)
    assert r.error.startswith("context_length_exceeded: ") and "512" in r.error and "600" in r.error
    r = await generate(client, MODEL, PROMPTS[0], temperature=-1.0)
    assert r.error.startswith("invalid_request: ") and "temperature" in r.error


async def until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    """Wait for a state the streams reach (polling the event loop), never a bare sleep."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_giant_prompt_does_not_stall_the_running_streams(client):
    """A 3.8 MB prompt was tokenized on the stub's execute() thread with the GIL held:
    every stream of the model stopped for seconds (8 such prompts: 14 s). Now its size is
    checked against the context before any tokenizing, off the engine loop.

    Counted, not timed: the model's running stream keeps pace with a stream of another
    model (another stub process, a clock no prompt to this model can stop) while giant
    prompts are in flight the whole time, as it did before they came."""
    log: list[str] = []
    giant = chat("lorem ipsum " * 300_000)                               # 3.6 MB
    streams = [asyncio.create_task(generate(client, model, PROMPTS[1], max_tokens=450, ignore_eos=True,
                                            on_piece=lambda _, tag=tag: log.append(tag)))
               for model, tag in ((MODEL, "model"), (INT4, "clock"))]
    try:
        await until(lambda: "model" in log and "clock" in log, what="both streams to start")
        calm = len(log)
        await until(lambda: log[calm:].count("clock") >= 40, what="40 tokens of the clock")
        calm_log = log[calm:]
        start, answers = len(log), []
        while log[start:].count("clock") < 40:                          # giants in flight throughout
            answers += await asyncio.gather(*(generate(client, MODEL, giant, max_tokens=16) for _ in range(2)))
        during_log = log[start:]
    finally:
        for s in streams:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    pace = [w.count("model") / w.count("clock") for w in (calm_log, during_log)]   # model tokens per clock tick
    counts = (f"model/clock tokens: {calm_log.count('model')}/{calm_log.count('clock')} before, "
              f"{during_log.count('model')}/{during_log.count('clock')} with {len(answers)} giants in flight")
    assert calm_log.count("model") >= 6, counts
    assert pace[1] >= pace[0] / 3, counts
    for r in answers:                                                    # refused before tokenizing
        assert r.error.startswith("context_length_exceeded: ") and f"has {len(giant)} characters" in r.error
        assert "512 tokens" in r.error


async def test_token_ids_outside_the_vocabulary_are_invalid(client):
    for ids in ([1, -5], [1, 2**40]):
        r = await generate(client, MODEL, input_ids=ids, max_tokens=2)
        assert r.error.startswith("invalid_request: input_ids[1] ") and "vocabulary size is " in r.error


async def test_multibyte_characters_stream_whole(client):
    prompt = chat("How do you say 'thank you' in Japanese? Answer with the Japanese characters only.")
    streamed = await generate(client, MODEL, prompt, max_tokens=12)
    whole = await generate(client, MODEL, prompt, max_tokens=12, stream=False)
    assert streamed.text == whole.text
    assert any(ord(ch) > 0x3000 for ch in streamed.text)               # CJK came through
    assert all("\ufffd" not in p for p in streamed.pieces)
    assert len(streamed.pieces) - 1 < streamed.num_output_tokens        # some tokens were held


async def test_cancelled_stream_frees_its_slot(client, server):
    r = await generate(client, MODEL, PROMPTS[1], max_tokens=400, ignore_eos=True, cancel_after=3)
    assert r.responses == 3
    assert r.num_input_tokens > 0 and r.num_output_tokens >= 3          # billable after leaving
    for _ in range(100):
        if metric(server, "llm_num_requests_running") == 0:
            break
        await asyncio.sleep(0.1)
    assert metric(server, "llm_num_requests_running") == 0
    assert metric(server, "llm_generation_tokens_total") > 0


async def test_queue_overflow_is_over_capacity(client, server):
    # one slot, one place in the queue: the third and fourth concurrent requests are refused
    results = await asyncio.gather(*(generate(client, SMALL, PROMPTS[1], max_tokens=40, ignore_eos=True)
                                     for _ in range(4)))
    errors = [r.error for r in results if r.error]
    assert len(errors) >= 1 and all(e.startswith("over_capacity: ") for e in errors)
    assert sum(r.finish_reason == "length" for r in results) >= 2


async def test_corrupt_model_is_not_ready_and_says_why(client, server):
    assert not await client.is_model_ready(BROKEN)
    assert await client.is_model_ready(MODEL)
    log = Path(server.log_path).read_text(errors="replace")
    assert f"model {BROKEN} version 1 cannot load" in log and "onnxruntime cannot load" in log
