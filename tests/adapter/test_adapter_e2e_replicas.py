"""Two tritonserver replicas behind one adapter: load spreads to the least loaded one, a
killed replica costs no failed request, and it rejoins after a restart."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from adapter_testlib import AdapterProcess, load_fakellm, start_triton  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    fakellm = load_fakellm()
    servers, marks = [], []
    try:
        for name in ("a", "b"):
            (tmp / name / "marks").mkdir(parents=True)
            fakellm.make_model_dir(tmp / name / "repo", "fake", log_dir=tmp / name / "marks")
            servers.append(start_triton(tmp / name / "repo", tmp / name / "triton.log", {"fakellm": fakellm.MODEL_PY}))
            marks.append(tmp / name / "marks")
        adapter = AdapterProcess(",".join(s.grpc_url for s in servers), ",".join(s.http_url for s in servers),
                                 tmp / "adapter.log", ADAPTER_HEALTH_INTERVAL_S=0.5, ADAPTER_BREAKER_OPEN_S=0.5)
        adapter.start().wait_ready()
        yield servers, marks, adapter
    finally:
        if "adapter" in locals():
            adapter.stop()
        stoppers = [threading.Thread(target=s.stop) for s in servers]  # in parallel: each takes seconds
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


async def _burst(url: str, tag: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as http:
        async def one(i: int) -> int:
            r = await http.post(url + "/v1/completions", json={
                "model": "fake", "prompt": f"[[delay=50]] [[tag={tag}{i}]]", "max_tokens": 8})
            return r.status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


async def test_load_spreads_over_replicas(replicas):
    servers, marks, adapter = replicas
    assert await _burst(adapter.url, "spread", 8) == [200] * 8
    per_replica = [len(list(m.glob("spread*.finished"))) for m in marks]
    assert sum(per_replica) == 8 and min(per_replica) >= 3, per_replica


async def test_killed_replica_costs_no_request_and_rejoins(replicas):
    servers, marks, adapter = replicas
    servers[0].kill()
    statuses = []
    for round_ in range(3):
        statuses += await _burst(adapter.url, f"failover{round_}-", 4)
    assert statuses == [200] * 12
    servers[0].start()
    servers[0].wait_ready(timeout=60)
    # The circuit closes once the endpoint generates again (over gRPC, not only HTTP).
    deadline = time.monotonic() + 30
    while any(l.startswith("adapter_circuit_open{") and l.endswith(" 1.0")
              for l in httpx.get(adapter.url + "/metrics").text.splitlines()):
        assert time.monotonic() < deadline, "the restarted replica's circuit stayed open for 30 s"
        await asyncio.sleep(0.2)
    assert await _burst(adapter.url, "rejoin", 8) == [200] * 8
    assert len(list(marks[0].glob("rejoin*.finished"))) >= 2
