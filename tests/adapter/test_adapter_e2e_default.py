"""End to end with the real default model (SmolLM2-135M-Instruct) on real tritonserver,
driven by the official openai SDK (sync and async, streaming and not) and raw HTTP."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from adapter_testlib import AdapterProcess, start_triton  # type: ignore[import-not-found]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from stack.default_model import ensure_default_model  # exports once, then hard-links from the cache
    tmp = tmp_path_factory.mktemp("default_e2e")
    ensure_default_model(tmp / "repo", name=MODEL)
    triton = start_triton(tmp / "repo", tmp / "triton.log")
    adapter = AdapterProcess(triton.grpc_url, triton.http_url, tmp / "adapter.log", ADAPTER_HEALTH_INTERVAL_S=1)
    try:
        adapter.start().wait_ready(timeout=120)
        yield {"triton": triton, "adapter": adapter}
    finally:
        adapter.stop()
        triton.stop()


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack["adapter"].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_sync_greedy_answer_usage_and_finish_reasons(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # end of sequence
    assert 0 < r.usage.completion_tokens < 40 and r.usage.prompt_tokens > 20  # counted after the chat template
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_chat_stream_sync_matches_non_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=4)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                 max_completion_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1


def test_stop_sequence_excluded_streaming_and_not(client):
    kw = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30, stop=["Paris"])
    r = client.chat.completions.create(**kw)
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_sync_and_unknown_fields_accepted(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  extra_body={"a_field_from_the_future": True})
    assert r.object == "text_completion" and r.choices[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4
    d = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0)
    assert d.usage.completion_tokens <= 16  # legacy default


def test_seed_reproducible(client):
    kw = dict(model=MODEL, messages=QUESTION, temperature=1.0, max_tokens=8, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


async def test_async_sdk_streaming_and_not(stack):
    aclient = openai.AsyncOpenAI(base_url=stack["adapter"].url + "/v1", api_key="unused", max_retries=0)
    r = await aclient.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].message.content
    stream = await aclient.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=6, stream=True,
                                              temperature=0)
    pieces = [c async for c in stream]
    assert "".join(c.choices[0].text for c in pieces) and pieces[-1].choices[0].finish_reason == "length"
    await aclient.close()


def test_errors_raw_http(stack):
    url = stack["adapter"].url
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "word " * 5000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert re.search(r"\d{4}", r.json()["error"]["message"])
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "top_k": -7})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/health/ready").status_code == 200


def _running(triton) -> float:
    text = httpx.get(f"http://127.0.0.1:{triton.metrics_port}/metrics").text
    values = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("llm_num_requests_running")]
    return sum(values)


async def test_sixteen_dropped_streams_do_not_slow_the_next_request(stack):
    url = stack["adapter"].url + "/v1/chat/completions"
    probe = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 16}
    async with httpx.AsyncClient(timeout=120) as http:
        t = time.monotonic()
        assert (await http.post(url, json=probe)).status_code == 200
        baseline = time.monotonic() - t

        async def drop_after_first_chunk() -> None:
            async with http.stream("POST", url, json={"model": MODEL, "messages": QUESTION, "max_tokens": 1500,
                                                      "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return

        await asyncio.gather(*(drop_after_first_chunk() for _ in range(16)))
        deadline = time.monotonic() + 10
        while _running(stack["triton"]) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert _running(stack["triton"]) == 0  # every dropped stream freed its slot
        t = time.monotonic()
        assert (await http.post(url, json=probe)).status_code == 200
        after = time.monotonic() - t
    print(f"\nnext request: {baseline:.2f}s before, {after:.2f}s after 16 dropped streams")
    assert after < 4 * baseline + 2.0  # generous (shared CPUs): the dropped streams no longer run
