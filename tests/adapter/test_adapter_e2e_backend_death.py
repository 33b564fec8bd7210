"""The model's backend process dies (SIGKILL of Triton's Python stub) under load: every
stream gets an OpenAI error event and [DONE] instead of hanging, new requests get 503
with Retry-After, and the model is loaded again by itself and serves."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import httpx
import psutil
import pytest

from adapter_testlib import AdapterProcess, load_fakellm, start_triton  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("death")
    fakellm = load_fakellm()
    fakellm.make_model_dir(tmp / "repo", "fake")
    triton = start_triton(tmp / "repo", tmp / "triton.log", {"fakellm": fakellm.MODEL_PY})
    adapter = AdapterProcess(triton.grpc_url, triton.http_url, tmp / "adapter.log")  # default health interval
    try:
        adapter.start().wait_ready()
        yield triton, adapter
    finally:
        adapter.stop()
        triton.stop()


def _stub(triton) -> psutil.Process:
    stubs = [p for p in psutil.Process(triton.proc.pid).children(recursive=True)
             if p.status() != psutil.STATUS_ZOMBIE and "triton_python_backend_stub" in " ".join(p.cmdline())
             and "/fake/" in " ".join(p.cmdline())]
    assert len(stubs) == 1, stubs
    return stubs[0]


def _model_ready(triton) -> bool:
    try:
        with urllib.request.urlopen(f"{triton.http_url}/v2/models/fake/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


async def test_dead_backend_process_ends_streams_and_comes_back(stack):
    triton, adapter = stack
    body = {"model": "fake", "messages": [{"role": "user", "content": "[[delay=100]] go"}], "max_tokens": 200,
            "stream": True}
    started = asyncio.Event()
    first_chunks = 0
    killed_at: list[float] = []

    async def stream(http: httpx.AsyncClient) -> dict:
        nonlocal first_chunks
        events, got_first = [], False
        async with http.stream("POST", adapter.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if not got_first:
                        got_first = True
                        first_chunks += 1
                        if first_chunks == 8:
                            started.set()
        return {"events": events, "ended": time.monotonic()}

    async with httpx.AsyncClient(timeout=60) as http:
        streams = [asyncio.ensure_future(stream(http)) for _ in range(8)]
        await asyncio.wait_for(started.wait(), 30)
        old = _stub(triton)
        old.kill()
        killed_at.append(time.monotonic())
        results = await asyncio.wait_for(asyncio.gather(*streams), 30)  # never a hang
        for res in results:
            assert res["events"][-1] == "[DONE]", res["events"][-3:]
            err = json.loads(res["events"][-2])["error"]
            assert err["code"] == "model_restarting" and "being loaded again" in err["message"]
        waits = [res["ended"] - killed_at[0] for res in results]

        # New requests: 503 with Retry-After while it reloads, then answers again by itself.
        statuses = []
        deadline = time.monotonic() + 30
        while True:
            r = await http.post(adapter.url + "/v1/chat/completions",
                                json={**body, "stream": False, "max_tokens": 2, "messages": [
                                    {"role": "user", "content": "hi"}]})
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["error"]["code"] in ("model_restarting", "model_not_ready")
            assert time.monotonic() < deadline, statuses
            await asyncio.sleep(0.2)
        assert _stub(triton).pid != old.pid  # a new backend process
        assert _model_ready(triton)
        for _ in range(50):
            if (await http.get(adapter.url + "/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.2)
        assert (await http.get(adapter.url + "/health/ready")).status_code == 200
        metrics = (await http.get(adapter.url + "/metrics")).text
        assert "adapter_requests_in_flight 0.0" in metrics
        assert 'kind="backend_died"' in metrics
    print(f"streams ended {min(waits):.2f}-{max(waits):.2f} s after the kill; statuses while reloading {statuses}")
