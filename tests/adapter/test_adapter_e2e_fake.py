"""End to end: real tritonserver serving the scriptable fake model (tests/fixtures/fakellm)
and the real adapter process. Every failure path, without the real model."""
from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapter_testlib import AdapterProcess, load_fakellm, start_triton  # type: ignore[import-not-found]
from stack.ports import free_port

pytestmark = pytest.mark.e2e

# The adapter's request deadline: long enough that the overload test's slow requests and
# waiters are all still there when its refused request comes, on a loaded CI machine.
TIMEOUT_S = 6.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake_e2e")
    fakellm = load_fakellm()
    log_dir = tmp / "marks"
    log_dir.mkdir()
    fakellm.make_model_dir(tmp / "repo", "fake", log_dir=log_dir)
    fakellm.make_model_dir(tmp / "repo", "fakeq", log_dir=log_dir, triton_queue_size=1, max_batch_size=1)
    triton = start_triton(tmp / "repo", tmp / "triton.log", {"fakellm": fakellm.MODEL_PY})
    dead = free_port()  # a second endpoint that never answers: skipped by its circuit
    adapter = AdapterProcess(f"{triton.grpc_url},127.0.0.1:{dead}", f"{triton.http_url},http://127.0.0.1:{dead}",
                             tmp / "adapter.log", ADAPTER_REQUEST_TIMEOUT_S=TIMEOUT_S, ADAPTER_MAX_IN_FLIGHT=4,
                             ADAPTER_MAX_WAITING=2, ADAPTER_MAX_QUEUE_WAIT_S=60,  # the line's length decides
                             ADAPTER_HEALTH_INTERVAL_S=0.5, ADAPTER_HEALTH_MAX_AGE_S=5,
                             ADAPTER_BREAKER_OPEN_S=0.5)
    try:
        adapter.start().wait_ready()
        yield {"triton": triton, "adapter": adapter, "marks": log_dir, "tmp": tmp}
    finally:
        adapter.stop()
        triton.stop()


def wait_for(path: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def chat(text: str, **kw) -> dict:
    return {"model": "fake", "messages": [{"role": "user", "content": text}], **kw}


def test_sdk_streaming_and_not(stack):
    client = openai.OpenAI(base_url=stack["adapter"].url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(**chat("hi"), max_tokens=3)
    assert r.choices[0].message.content == "hello world from " and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    pieces = [c for c in client.chat.completions.create(**chat("hi"), max_tokens=3, stream=True,
                                                        stream_options={"include_usage": True})]
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == "hello world from "
    assert pieces[-1].usage.total_tokens == pieces[-1].usage.prompt_tokens + 3
    assert [m.id for m in client.models.list()] == ["fake", "fakeq"]


def test_dead_endpoint_is_skipped_and_its_circuit_open(stack):
    metrics = httpx.get(stack["adapter"].url + "/metrics").text
    dead = [l for l in metrics.splitlines() if l.startswith("adapter_circuit_open{")]
    assert sorted(l.rsplit(" ", 1)[1] for l in dead) == ["0.0", "1.0"]


def test_failure_mid_stream_is_error_event_then_done(stack):
    with httpx.stream("POST", stack["adapter"].url + "/v1/chat/completions",
                      json=chat("[[fail_at=3]]", stream=True, max_tokens=10)) as r:
        assert r.status_code == 200
        events = [l[6:] for l in r.iter_lines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    client = openai.OpenAI(base_url=stack["adapter"].url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(**chat("[[fail_at=3]]"), max_tokens=10, stream=True):
            pass


def test_failure_before_first_token_is_http_status(stack):
    url = stack["adapter"].url + "/v1/completions"
    for prompt, status in (("[[fail_at=0]]", 500), ("[[error=over_capacity: engine queue full]]", 429),
                           ("[[error=invalid_request: top_k must be >= 0, got -3]]", 400)):
        r = httpx.post(url, json={"model": "fake", "prompt": prompt, "stream": True})
        assert r.status_code == status, (prompt, r.text)
    r = httpx.post(url, json={"model": "fake", "prompt": "word " * 300})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_deadline_gives_504_and_cancels_the_triton_request(stack):
    t = time.monotonic()
    r = httpx.post(stack["adapter"].url + "/v1/completions", timeout=30,
                   json={"model": "fake", "prompt": "[[delay=200]] [[tag=deadline]]", "max_tokens": 100})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert time.monotonic() - t < TIMEOUT_S + 2
    assert wait_for(stack["marks"] / "deadline.cancelled")


def test_stream_disconnect_cancels_at_once(stack):
    with httpx.stream("POST", stack["adapter"].url + "/v1/chat/completions",
                      json=chat("[[delay=100]] [[tag=dropstream]]", stream=True, max_tokens=25)) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # first chunk, then hang up
    assert wait_for(stack["marks"] / "dropstream.cancelled", 2.0)
    assert not (stack["marks"] / "dropstream.finished").exists()


def test_non_stream_disconnect_cancels(stack):
    with pytest.raises(httpx.ReadTimeout):
        # gone after 2 s (time to reach the model on a loaded machine), before its 5 s of
        # generation and the 6 s deadline: only the disconnect can cancel it
        httpx.post(stack["adapter"].url + "/v1/completions", timeout=2.0,
                   json={"model": "fake", "prompt": "[[delay=100]] [[tag=dropwhole]]", "max_tokens": 50})
    assert wait_for(stack["marks"] / "dropwhole.cancelled", 2.0)


async def test_overload_gives_429_with_retry_after_at_once(stack):
    url = stack["adapter"].url
    async with httpx.AsyncClient(timeout=30) as http:
        # One finished request: admission has a duration to estimate waits from.
        assert (await http.post(url + "/v1/completions", json={"model": "fake", "prompt": "x",
                                                               "max_tokens": 2})).status_code == 200

        async def slow(i: int) -> None:
            async with http.stream("POST", url + "/v1/completions", json={
                    "model": "fake", "prompt": f"[[delay=200]] [[tag=busy{i}]]", "max_tokens": 40,
                    "stream": True}) as r:
                async for _ in r.aiter_lines():
                    pass

        tasks = [asyncio.ensure_future(slow(i)) for i in range(6)]  # 4 run + 2 wait
        try:
            for _ in range(100):
                m = (await http.get(url + "/metrics")).text
                if "adapter_requests_in_flight 4.0" in m and "adapter_requests_waiting 2.0" in m:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the slow requests were not admitted/queued")
            # Admitted is not yet started: the backend must hold all four before the
            # disconnects, or the cancellation checks below race the gRPC send.
            for _ in range(100):
                if len(list(stack["marks"].glob("busy*.started"))) >= 4:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the backend did not start the four admitted requests")
            t = time.monotonic()
            r = await http.post(url + "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1})
            assert r.status_code == 429 and r.headers["retry-after"]
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert time.monotonic() - t < 1.0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    started = sorted(p.stem for p in stack["marks"].glob("busy*.started"))
    assert len(started) >= 4  # a waiter may get a slot just before its own disconnect is seen
    for tag in started:  # the running ones were cancelled by the disconnects
        assert wait_for(stack["marks"] / f"{tag}.cancelled", 3.0), tag
    r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200


async def test_triton_queue_full_is_429(stack):
    url = stack["adapter"].url + "/v1/completions"
    async with httpx.AsyncClient(timeout=30) as http:
        async def one(i: int):
            await asyncio.sleep(0.05 * i)  # in order: one runs, one waits in Triton's queue, the rest overflow
            return await http.post(url, json={"model": "fakeq", "prompt": "[[block=1000]]", "max_tokens": 1})
        rs = await asyncio.gather(*(one(i) for i in range(4)))
    statuses = sorted(r.status_code for r in rs)
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, [r.text for r in rs]
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["retry-after"] and busy.json()["error"]["type"] == "rate_limit_error"


def test_sigterm_drains_in_flight_stream_then_exits(stack):
    triton = stack["triton"]
    adapter = AdapterProcess(triton.grpc_url, triton.http_url, stack["tmp"] / "adapter-drain.log",
                             ADAPTER_HEALTH_INTERVAL_S=0.5, ADAPTER_SHUTDOWN_GRACE_S=10)
    adapter.start()
    try:
        adapter.wait_ready()
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", adapter.url + "/v1/completions", json={
                    "model": "fake", "prompt": "[[delay=100]]", "max_tokens": 40, "stream": True}) as r:
                # 4 s: the stream outlasts the checks below (once it ends the adapter exits)
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                adapter.proc.send_signal(signal.SIGTERM)
                assert httpx.get(adapter.url + "/health/ready").status_code == 503
                refused = httpx.post(adapter.url + "/v1/completions", json={"model": "fake", "prompt": "x"},
                                     timeout=2)
                rest = [l for l in lines if l.startswith("data: ")]
            assert rest[-1] == "data: [DONE]" and all('"error"' not in l for l in rest)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == "shutting_down"
        assert adapter.proc.wait(10) == 0
    finally:
        adapter.stop()


def test_triton_killed_gives_fast_503_then_recovers_after_restart(stack):
    """Last: kills and restarts the module's tritonserver."""
    triton, url = stack["triton"], stack["adapter"].url
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", url + "/v1/chat/completions",
                         json=chat("[[delay=100]]", stream=True, max_tokens=40)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            regions = sorted(Path("/dev/shm").glob(f"{triton.shm_prefix}*"))
            assert regions, "the server's Python stubs should use its own shared-memory prefix"
            triton.kill()
            # SIGKILL leaves the stubs' shared memory behind; kill() removes it
            assert not [p for p in regions if p.exists()]
            rest = [l for l in lines if l.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2]

        statuses, times = [], []
        for _ in range(8):
            t = time.monotonic()
            r = http.post(url + "/v1/chat/completions", json=chat("hi", max_tokens=1))
            times.append(time.monotonic() - t)
            statuses.append(r.status_code)
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["error"]["type"] == "server_error"
        assert max(times) < 1.0, times
        assert http.get(url + "/health/ready").status_code == 503
        assert http.get(url + "/health/live").status_code == 200

        triton.start()
        triton.wait_ready(timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = http.post(url + "/v1/chat/completions", json=chat("hi", max_tokens=1))
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while http.get(url + "/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.get(url + "/health/ready").status_code == 200
