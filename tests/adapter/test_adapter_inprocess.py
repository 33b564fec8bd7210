"""The adapter app in process (httpx ASGI) over a fake Triton client."""
from __future__ import annotations

import asyncio
import json

import pytest

from adapter_testlib import FakeClient, app_client, wait_until  # type: ignore[import-not-found]
from openai_adapter.triton_client import ModelInfo

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def msgs(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def sse_events(body: str) -> list:
    out = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_chat_non_streaming_shape_and_usage():
    async with app_client() as (http, fake):
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs("one two"), "max_tokens": 3})
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "hello world from ", "refusal": None}
        assert choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
        # the model's own template with the generation prompt
        assert fake.requests[0].prompt == "<|user|>one two\n<|assistant|>"


async def test_chat_streaming_chunks_role_finish_usage_done():
    async with app_client() as (http, _):
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs(), "max_tokens": 2, "stream": True,
                                        "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert "event:" not in r.text
        ev = sse_events(r.text)
        assert ev[-1] == "[DONE]"
        chunks = ev[:-1]
        assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "hello world "
        last_choice = chunks[-2]["choices"][0]
        assert last_choice["delta"] == {} and last_choice["finish_reason"] == "length"
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


async def test_max_completion_tokens_wins_and_absent_means_context():
    async with app_client() as (http, fake):
        await http.post(CHAT, json={"model": "fake", "messages": msgs(), "max_tokens": 5, "max_completion_tokens": 2})
        await http.post(CHAT, json={"model": "fake", "messages": msgs()})
        await http.post(COMP, json={"model": "fake", "prompt": "x"})
        assert [r.max_tokens for r in fake.requests] == [2, None, 16]


async def test_stop_sequence_cut_across_pieces_streaming_and_not():
    async with app_client() as (http, fake):
        body = {"model": "fake", "prompt": "[[words=ab cd ef]]", "max_tokens": 10, "stop": ["d e"]}
        r = await http.post(COMP, json=body)
        assert r.json()["choices"][0]["text"] == "ab c" and r.json()["choices"][0]["finish_reason"] == "stop"
        r = await http.post(COMP, json={**body, "stream": True})
        ev = sse_events(r.text)
        assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == "ab c"
        assert ev[-2]["choices"][0]["finish_reason"] == "stop"
        assert fake.cancelled  # the rest of the generation was cancelled
        assert fake.requests[0].stop == ["d e"]  # and the engine was told too


async def test_n_choices_and_multiple_prompts():
    async with app_client() as (http, fake):
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs(), "max_tokens": 2, "n": 3, "seed": 7})
        assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
        assert [q.seed for q in fake.requests] == [7, 8, 9]  # reproducible, yet different choices
        assert r.json()["usage"]["completion_tokens"] == 6
        r = await http.post(COMP, json={"model": "fake", "prompt": ["a", "b c"], "max_tokens": 1, "n": 2,
                                        "stream": True})
        ev = sse_events(r.text)
        finished = sorted(c["choices"][0]["index"] for c in ev[:-1] if c["choices"][0]["finish_reason"])
        assert finished == [0, 1, 2, 3]


async def test_completions_echo_and_token_prompt():
    async with app_client() as (http, fake):
        r = await http.post(COMP, json={"model": "fake", "prompt": "say:", "max_tokens": 1, "echo": True})
        assert r.json()["choices"][0]["text"] == "say:hello "
        r = await http.post(COMP, json={"model": "fake", "prompt": [1, 2, 3], "max_tokens": 1})
        assert r.status_code == 200 and fake.requests[-1].prompt == [1, 2, 3]


async def test_null_optional_fields_mean_not_given():
    async with app_client() as (http, fake):
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs(), "n": None, "stream": None, "stop": None,
                                        "temperature": None, "max_tokens": None, "stream_options": None})
        assert r.status_code == 200 and len(r.json()["choices"]) == 1
        # Not given: OpenAI's default temperature (1) is sent; max_tokens stays open (up to the context).
        assert fake.requests[0].temperature == 1.0 and fake.requests[0].max_tokens is None


async def test_temperature_zero_is_passed_as_greedy():
    async with app_client() as (http, fake):
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs(), "temperature": 0})
        assert r.status_code == 200 and fake.requests[0].temperature == 0.0


async def test_unknown_fields_accepted_and_logged(caplog):
    async with app_client() as (http, _):
        with caplog.at_level("INFO"):
            r = await http.post(CHAT, json={"model": "fake", "messages": msgs(), "max_tokens": 1,
                                            "brand_new_field": {"x": 1}, "store": False})
        assert r.status_code == 200
        assert "brand_new_field" in caplog.text


BAD = [
    # (endpoint, body or raw bytes, status, type, param)
    (CHAT, b"{not json", 400, "invalid_request_error", None),
    (CHAT, b"[1, 2]", 400, "invalid_request_error", None),
    (CHAT, b"", 400, "invalid_request_error", None),
    (CHAT, b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "invalid_request_error", "temperature"),
    (CHAT, {"model": "fake", "messages": msgs(), "n": 2.5}, 400, "invalid_request_error", "n"),
    (CHAT, {"model": "fake", "messages": msgs(), "tool_choice": "required"}, 400, "invalid_request_error", "tool_choice"),
    (CHAT, {"messages": msgs()}, 400, "invalid_request_error", "model"),
    (CHAT, {"model": "fake"}, 400, "invalid_request_error", "messages"),
    (CHAT, {"model": "fake", "messages": []}, 400, "invalid_request_error", "messages"),
    (CHAT, {"model": "fake", "messages": "hi"}, 400, "invalid_request_error", "messages"),
    (CHAT, {"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request_error", "messages.0.role"),
    (CHAT, {"model": "fake", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request_error", None),
    (CHAT, {"model": "fake", "messages": msgs(), "temperature": 3}, 400, "invalid_request_error", "temperature"),
    (CHAT, {"model": "fake", "messages": msgs(), "temperature": "hot"}, 400, "invalid_request_error", "temperature"),
    (CHAT, {"model": "fake", "messages": msgs(), "top_p": 1.5}, 400, "invalid_request_error", "top_p"),
    (CHAT, {"model": "fake", "messages": msgs(), "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    (CHAT, {"model": "fake", "messages": msgs(), "max_tokens": -5}, 400, "invalid_request_error", "max_tokens"),
    (CHAT, {"model": "fake", "messages": msgs(), "max_tokens": "ten"}, 400, "invalid_request_error", "max_tokens"),
    (CHAT, {"model": "fake", "messages": msgs(), "presence_penalty": 9}, 400, "invalid_request_error", "presence_penalty"),
    (CHAT, {"model": "fake", "messages": msgs(), "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request_error", "stop"),
    (CHAT, {"model": "fake", "messages": msgs(), "n": 0}, 400, "invalid_request_error", "n"),
    (CHAT, {"model": "fake", "messages": msgs(), "n": 100}, 400, "invalid_request_error", "n"),
    (CHAT, {"model": "fake", "messages": msgs(), "stream": "yes"}, 400, "invalid_request_error", "stream"),
    (CHAT, {"model": "fake", "messages": msgs(), "stream_options": {"include_usage": True}}, 400, "invalid_request_error", "stream_options"),
    (CHAT, {"model": "fake", "messages": msgs(), "logprobs": True}, 400, "invalid_request_error", "logprobs"),
    (CHAT, {"model": "fake", "messages": msgs(), "top_logprobs": 3}, 400, "invalid_request_error", "top_logprobs"),
    (CHAT, {"model": "fake", "messages": msgs(), "logit_bias": {"50256": -100}}, 400, "invalid_request_error", "logit_bias"),
    (CHAT, {"model": "fake", "messages": msgs(), "response_format": {"type": "json_object"}}, 400, "invalid_request_error", "response_format"),
    (CHAT, {"model": "fake", "messages": msgs(), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "invalid_request_error", "tools"),
    (CHAT, {"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "invalid_request_error", "messages.0.content.0"),
    (CHAT, {"model": "fake", "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_request_error", "messages"),
    (CHAT, {"model": "nope", "messages": msgs()}, 404, "invalid_request_error", "model"),
    (COMP, {"model": "fake"}, 400, "invalid_request_error", "prompt"),
    (COMP, {"model": "fake", "prompt": 5}, 400, "invalid_request_error", "prompt"),
    # beyond int64: the INT64 tensor cannot hold it (was a plain-text 500)
    (COMP, {"model": "fake", "prompt": [2**63]}, 400, "invalid_request_error", "prompt.0"),
    (COMP, {"model": "fake", "prompt": "x", "logprobs": 2}, 400, "invalid_request_error", "logprobs"),
    (COMP, {"model": "fake", "prompt": "x", "best_of": 3}, 400, "invalid_request_error", "best_of"),
    (COMP, {"model": "fake", "prompt": "x", "suffix": "y"}, 400, "invalid_request_error", "suffix"),
    (COMP, {"model": "fake", "prompt": "x", "echo": True, "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "invalid_request_error", "stream_options.include_usage"),
    (COMP, {"model": "fake", "prompt": "x [[error=context_length_exceeded: context length is 64 tokens, prompt has 99]]"}, 400, "invalid_request_error", None),
    (COMP, {"model": "fake", "prompt": "x [[error=invalid_request: top_k must be >= 0, got -3]]"}, 400, "invalid_request_error", None),
]


@pytest.mark.parametrize("path,body,status,etype,param", BAD)
async def test_bad_requests_get_openai_errors_and_service_stays_healthy(path, body, status, etype, param):
    async with app_client() as (http, _):
        if isinstance(body, bytes):
            r = await http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = await http.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == etype and err["message"]
        if param is not None:
            assert err["param"] == param, err
        assert "Traceback" not in err["message"] and "/work" not in err["message"]
        ok = await http.post(CHAT, json={"model": "fake", "messages": msgs(), "max_tokens": 1})
        assert ok.status_code == 200
        assert (await http.get("/health/ready")).status_code == 200


async def test_context_length_code():
    async with app_client() as (http, _):
        r = await http.post(COMP, json={"model": "fake", "prompt": "[[error=context_length_exceeded: 99 > 64]]"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_route_errors_404_405_413_have_openai_bodies():
    async with app_client(max_body_bytes=1000) as (http, _):
        r = await http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        r = await http.get(CHAT)
        assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs("x" * 2000)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunked():
            yield b'{"model": "fake", "messages": [{"role": "user", "content": "'
            yield b"y" * 2000
            yield b'"}]}'
        r = await http.post(CHAT, content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413


async def test_api_keys_everywhere_but_health():
    async with app_client(api_keys=["k1", "k2"]) as (http, _):
        for path, method in ((CHAT, "POST"), ("/v1/models", "GET"), ("/metrics", "GET"), ("/nope", "GET")):
            r = await http.request(method, path, json={})
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error"
        r = await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await http.get("/v1/models", headers={"Authorization": "Bearer k2"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "fake"
        assert (await http.get("/health/live")).status_code == 200
        assert (await http.get("/health/ready")).status_code == 200


async def test_models_list_and_get():
    async with app_client() as (http, _):
        data = (await http.get("/v1/models")).json()
        assert data["object"] == "list"
        assert set(data["data"][0]) == {"id", "object", "created", "owned_by"}
        assert (await http.get("/v1/models/fake")).json()["id"] == "fake"
        r = await http.get("/v1/models/other")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_model_errors_before_first_token_are_real_statuses():
    cases = [("over_capacity: queue full", 429), ("Exceeds maximum queue size", 429), ("internal: boom", 500),
             ("invalid_request: bad", 400)]
    async with app_client() as (http, _):
        for message, status in cases:
            r = await http.post(COMP, json={"model": "fake", "prompt": f"[[error={message}]]", "stream": True})
            assert r.status_code == status, message
            if status == 429:
                assert r.headers["retry-after"] == "1"


async def test_failure_after_first_token_is_error_event_then_done():
    async with app_client() as (http, fake):
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs("[[fail_at=2]]"), "stream": True})
        assert r.status_code == 200
        ev = sse_events(r.text)
        assert ev[-1] == "[DONE]"
        assert ev[-2]["error"]["type"] == "server_error"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in ev[:-2]) == "hello world "


async def test_admission_limit_429_with_retry_after_at_once():
    async with app_client(max_in_flight=1, max_waiting=1, max_queue_wait_s=60) as (http, fake):
        slow = {"model": "fake", "prompt": "[[delay=200]]", "max_tokens": 5}   # 1 s each
        assert (await http.post(COMP, json=slow)).status_code == 200  # a duration to estimate waits from
        deps = http.app.state.deps
        first = asyncio.ensure_future(http.post(COMP, json=slow))
        await wait_until(lambda: deps.admission.in_flight == 1, "the first running")
        second = asyncio.ensure_future(http.post(COMP, json=slow))
        await wait_until(lambda: deps.admission.waiting == 1, "the second waiting")
        loop = asyncio.get_running_loop()
        t = loop.time()
        r = await http.post(COMP, json=slow)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # the expected wait, rounded up
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert loop.time() - t < 0.9  # refused at once, not after the running ones (2 s)
        assert (await first).status_code == 200 and (await second).status_code == 200  # the waiter ran


async def test_deadline_504_and_upstream_cancelled():
    # 1.5 s: the deadline counts from arrival, the ledger's admit (a synced SQLite write)
    # included, and the streamed case must see its first token (0.1 s) before it; 5 s to generate
    async with app_client(request_timeout_s=1.5) as (http, fake):
        r = await http.post(COMP, json={"model": "fake", "prompt": "[[delay=100]]", "max_tokens": 50})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        assert fake.cancelled == [fake.requests[0].request_id]
        r = await http.post(COMP, json={"model": "fake", "prompt": "[[delay=100]]", "max_tokens": 50, "stream": True})
        ev = sse_events(r.text)
        assert ev[-2]["error"]["code"] == "deadline_exceeded" and ev[-1] == "[DONE]"
        assert len(fake.cancelled) == 2


async def test_not_ready_is_503_with_retry_after():
    async with app_client(FakeClient(ready=False)) as (http, _):
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs()})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert (await http.get("/health/ready")).status_code == 503
        assert (await http.get("/health/live")).status_code == 200


async def test_draining_refuses_new_requests_with_503():
    async with app_client() as (http, _):
        http.app.state.deps.draining = True
        r = await http.post(CHAT, json={"model": "fake", "messages": msgs()})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert (await http.get("/health/ready")).status_code == 503


async def test_metrics_exposed():
    async with app_client() as (http, _):
        await http.post(CHAT, json={"model": "fake", "messages": msgs(), "max_tokens": 3, "stream": True})
        await http.post(CHAT, json={"model": "nope", "messages": msgs()})
        text = (await http.get("/metrics")).text
        for name in ('adapter_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0',
                     'adapter_requests_total{endpoint="/v1/chat/completions",status="404"} 1.0',
                     "adapter_time_to_first_token_seconds_bucket", "adapter_inter_token_latency_seconds_bucket",
                     "adapter_e2e_request_latency_seconds_bucket", 'adapter_completion_tokens_total{model="fake"} 3.0',
                     "adapter_prompt_tokens_total", "adapter_requests_in_flight 0.0", "adapter_requests_waiting 0.0"):
            assert name in text, name


async def test_every_streamed_token_is_reported_to_health():
    async with app_client() as (http, _):
        tokens: list[str] = []
        http.app.state.deps.on_token = tokens.append
        async with http.stream("POST", CHAT, json={"model": "fake", "messages": msgs("[[delay=20]]"),
                                                   "max_tokens": 5, "stream": True}) as r:
            seen_before_end = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content":"' in line and not seen_before_end:
                    seen_before_end = len(tokens)
        assert seen_before_end >= 1 and tokens == ["fake"] * 5


async def test_prober_does_not_queue_a_probe_behind_full_slots_while_tokens_flow():
    # The reliability suite: at 16 streams (every slot of the default model), a probe sent
    # just before the backend process died waited in the model's queue for 10 s, and the
    # death went unseen that long. While streams flow in every slot, their tokens prove
    # the model; a probe is sent once the tokens stop, or while a slot is free.
    from openai_adapter.health import Prober
    from openai_adapter.metrics import Metrics
    from openai_adapter.settings import Settings

    class Pool:
        sent = 0

        async def _stream(self, ep, req):
            Pool.sent += 1
            yield None

    prober = Prober(Pool(), Settings(health_interval_s=0.2), Metrics())
    full = {"fake": True}
    prober.slots_full = lambda model: full[model]
    prober.note_token("fake")
    await prober._generate(object(), "fake")
    assert Pool.sent == 0  # slots full, tokens flowing: no probe
    full["fake"] = False
    await prober._generate(object(), "fake")
    assert Pool.sent == 1  # a slot is free: the probe runs at once, as before
    full["fake"] = True
    prober.last_ok.clear()
    await asyncio.sleep(0.25)  # the tokens stopped
    await prober._generate(object(), "fake")
    assert Pool.sent == 2


@pytest.mark.parametrize("ready_when, ready_with_one_broken", [("any", True), ("all", False)])
def test_readiness_with_one_model_broken_follows_ready_when(ready_when, ready_with_one_broken):
    # Several models behind one adapter: with "all", one model that cannot generate takes
    # every adapter replica out of the Service, for the models that work too.
    from openai_adapter.health import Prober
    from openai_adapter.metrics import Metrics
    from openai_adapter.settings import Settings

    class Pool:
        endpoints: list = []

        def models(self):
            return [ModelInfo(name, max_model_len=64) for name in ("a", "b")]

    prober = Prober(Pool(), Settings(ready_when=ready_when), Metrics())
    ready, body = prober.status()
    assert not ready  # nothing proved yet
    prober.note_success("a")
    ready, body = prober.status()
    assert ready is ready_with_one_broken
    assert body["models"]["a"] == "ready" and body["models"]["b"].startswith("no successful generation")
    prober.note_success("b")
    assert prober.status()[0]


def _silence_setup(answer):
    """A Prober over a fake pool of one endpoint; `answer(req)` is what _stream does."""
    import time as _time
    from openai_adapter.health import Prober
    from openai_adapter.metrics import Metrics
    from openai_adapter.settings import Settings
    from openai_adapter.triton_client import CircuitBreaker

    class Ep:
        grpc_url, http_url = "ep:1", "http://ep:2"
        breaker = CircuitBreaker(3, 1.0)
        broken: dict = {}
        ready = {"m"}
        ready_versions = {"m": frozenset({1, 2})}
        streams = {("m", "2"): 2}
        last_heard = {("m", "2"): _time.monotonic()}

    class Pool:
        endpoints = [Ep()]
        sent: list = []

        async def _stream(self, ep, req):
            Pool.sent.append(req)
            await answer(req)
            yield None

    prober = Prober(Pool(), Settings(silence_probe_s=0.15), Metrics())
    prober.version_for = lambda model, ep=None: "1"
    return prober, Pool, Ep


async def test_silent_streams_get_a_probe_of_their_own_version_and_only_one_at_a_time():
    # A dead backend process shows only as silence on its open streams; the probe is what
    # makes Triton say "not healthy" (and _stream then ends the streams).
    import time as _time

    async def never(req):
        await asyncio.sleep(30)

    prober, Pool, Ep = _silence_setup(never)
    prober._look_for_silence(_time.monotonic(), 0.15)
    assert Pool.sent == [] and not prober._silence_probes  # heard just now: no probe
    now = Ep.last_heard[("m", "2")] + 0.2
    prober._look_for_silence(now, 0.15)
    prober._look_for_silence(now + 0.5, 0.15)  # the first is still out: no second one
    await asyncio.sleep(0.01)
    assert [(r.model, r.model_version, r.max_tokens) for r in Pool.sent] == [("m", "2", 1)]
    Ep.breaker.trip()
    for t in prober._silence_probes.values():
        t.cancel()
    await asyncio.sleep(0.01)
    prober._look_for_silence(now + 5, 0.15)  # circuit open: the prober's business
    await asyncio.sleep(0.01)
    assert len(Pool.sent) == 1


async def test_an_unanswered_silence_probe_is_dropped_and_the_next_goes_at_once(monkeypatch):
    # A probe that reached the backend just before it died is never answered: it must not
    # hold the watch (it held it for health_max_age_s, 10 s).
    import time as _time
    from openai_adapter import health

    monkeypatch.setattr(health, "SILENCE_PROBE_TIMEOUT_S", 0.05)

    async def never(req):
        await asyncio.sleep(30)

    prober, Pool, Ep = _silence_setup(never)
    now = _time.monotonic() + 1
    prober._look_for_silence(now, 0.15)
    await asyncio.sleep(0.2)  # timed out
    assert not prober._silence_probes
    prober._look_for_silence(now + 0.01, 0.15)  # within the second, yet it goes: the last got no answer
    await asyncio.sleep(0.01)
    assert len(Pool.sent) == 2
    for t in prober._silence_probes.values():
        t.cancel()
    await asyncio.sleep(0.01)


async def test_an_open_circuit_closes_only_once_the_endpoint_generates():
    # A restarted Triton answers HTTP before our gRPC channel is back: closing the circuit
    # on the HTTP answer alone sent every request to the other replicas.
    from openai_adapter.triton_client import UpstreamDown

    results = [UpstreamDown("reconnecting"), None]

    async def answer(req):
        r = results.pop(0)
        if r is not None:
            raise r

    prober, Pool, Ep = _silence_setup(answer)
    ep = Ep()
    ep.breaker = type(Ep.breaker)(3, 0.0)
    ep.breaker.trip()

    async def refresh():
        return None
    ep.refresh = refresh
    Pool.endpoints = [ep]
    await prober._probe_endpoint(0)
    assert ep.breaker.is_open and Pool.sent[-1].model_version == "1"  # gRPC not back: stays open
    await prober._probe_endpoint(0)
    assert not ep.breaker.is_open  # it generated: closed
