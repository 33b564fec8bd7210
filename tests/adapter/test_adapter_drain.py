"""The drain on SIGTERM, in process: its clock-driven steps with a fake clock, and what
requests in flight get when the grace period ends (an error event and [DONE], a 503),
settled in the ledger all the same. tests/adapter/test_adapter_drain_process.py runs it
for real under uvicorn with signals."""
from __future__ import annotations

import asyncio
import json

import sqlalchemy as sa

from adapter_testlib import app_client, wait_until  # type: ignore[import-not-found]
from openai_adapter.accounts.schema import ledger, reservations
from openai_adapter.accounts.store import make_engine
from openai_adapter.drain import Drain, margin_s

COMP = "/v1/completions"


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def test_margin_is_a_quarter_of_the_grace_up_to_two_seconds():
    assert margin_s(30) == 2.0 and margin_s(4) == 1.0 and margin_s(0) == 0.0


async def test_drain_steps_readiness_then_refusal_then_shutdown_when_idle():
    clock = Clock()
    d = Drain(grace_s=10, delay_s=3, clock=clock)
    assert not d.draining and not d.refusing and not d.step()
    assert d.begin() and not d.begin()
    d.active = 1
    assert d.draining and not d.refusing and not d.step()  # readiness fails; still serving normally
    clock.t += 3
    assert d.refusing and not d.step()  # new requests get 503; one still in flight
    d.active = 0
    assert d.step()  # none left: shut down now, long before the grace period's end


async def test_drain_ends_requests_before_the_grace_period_is_over():
    clock = Clock()
    d = Drain(grace_s=8, clock=clock)
    d.begin()
    d.active = 2
    ended = d.ended_future()
    clock.t += 5.9
    assert not d.step() and not d.ended and not ended.done()
    clock.t += 0.1  # 8 - 2 s of margin
    assert not d.step() and d.ended
    await asyncio.sleep(0)
    assert ended.done()
    clock.t += 2
    assert d.step()  # the grace period is over, whatever is still running
    assert d.ended_future() is ended


async def test_drain_bounds_a_timeout_entered_before_or_after_its_end():
    d = Drain(grace_s=8)
    with_drain: list[str] = []
    for _ in range(2):
        try:
            async with asyncio.timeout(60) as t:
                with d.bounding(t):
                    if not d.ended:
                        asyncio.get_running_loop().call_later(0.01, d.end_requests)
                    await asyncio.sleep(30)
        except TimeoutError:
            with_drain.append("ended")
    assert with_drain == ["ended", "ended"]


def _events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            out.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return out


async def test_drain_refuses_new_requests_with_503_retry_after_and_close(tmp_path):
    async with app_client(database_url=f"sqlite:///{tmp_path}/a.db", retry_after_s=3) as (http, fake):
        assert (await http.get("/health/ready")).status_code == 200
        http.app.state.deps.drain.begin()
        r = await http.post(COMP, json={"model": "fake", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.headers["connection"] == "close"  # the next request goes to another replica
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "server_error",
                                     "param": None, "code": "shutting_down"}
        ready = await http.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert (await http.get("/health/live")).status_code == 200
        assert not fake.requests


async def test_drain_end_gives_streams_an_error_event_and_done_and_settles_them(tmp_path):
    url = f"sqlite:///{tmp_path}/a.db"
    async with app_client(database_url=url, max_queue_wait_s=60) as (http, fake):
        deps = http.app.state.deps
        body = {"model": "fake", "prompt": "[[delay=50]]", "max_tokens": 200, "stream": True,
                "stream_options": {"include_usage": True}}
        stream = asyncio.ensure_future(http.post(COMP, json=body))
        whole = asyncio.ensure_future(http.post(COMP, json={**body, "stream": False, "stream_options": None}))
        await wait_until(lambda: len(fake.requests) == 2 and deps.drain.active == 2, "two requests running")
        await asyncio.sleep(0.2)  # a few tokens each
        deps.drain.begin()
        deps.drain.end_requests()
        r = await stream
        ev = _events(r.text)
        assert ev[-1] == "[DONE]" and ev[-2]["error"]["code"] == "shutting_down"
        assert ev[-2]["error"]["type"] == "server_error"
        streamed = sum(1 for e in ev[:-2] if e["choices"])
        w = await whole
        assert w.status_code == 503 and w.json()["error"]["code"] == "shutting_down" and w.headers["retry-after"]
        assert sorted(fake.cancelled) == sorted(q.request_id for q in fake.requests)  # the model was told
        assert deps.drain.active == 0 and deps.admission.in_flight == 0
    e = make_engine(url)
    with e.connect() as conn:
        rows = list(conn.execute(sa.select(ledger)))
        assert conn.execute(sa.select(sa.func.count()).select_from(reservations)).scalar() == 0
    e.dispose()
    assert sorted(r.outcome for r in rows) == ["failed", "failed"]
    by_id = {r.request_id: r for r in rows}
    assert by_id[ev[0]["id"]].completion_tokens >= streamed > 0  # billed what was generated


async def test_drain_end_answers_a_request_waiting_for_a_slot_with_503(tmp_path):
    async with app_client(database_url=f"sqlite:///{tmp_path}/a.db", max_in_flight=1,
                          max_queue_wait_s=60) as (http, fake):
        deps = http.app.state.deps
        assert (await http.post(COMP, json={"model": "fake", "prompt": "x", "max_tokens": 1})).status_code == 200
        slow = asyncio.ensure_future(http.post(COMP, json={"model": "fake", "prompt": "[[delay=50]]",
                                                           "max_tokens": 200}))
        await wait_until(lambda: deps.admission.in_flight == 1, "the slow request running")
        waiting = asyncio.ensure_future(http.post(COMP, json={"model": "fake", "prompt": "x", "max_tokens": 1}))
        await wait_until(lambda: deps.admission.waiting == 1, "a request waiting")
        deps.drain.begin()
        deps.drain.end_requests()
        for r in (await waiting, await slow):
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert deps.admission.waiting == 0 and deps.admission.in_flight == 0
