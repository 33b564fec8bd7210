"""Admission sized to the model's slots: the wait estimate, the decision, the line, and the
app answering 429 with Retry-After instead of queuing (fakes, no wall-clock assertions)."""
from __future__ import annotations

import asyncio

import pytest

from adapter_testlib import FakeClient, app_client, wait_until  # type: ignore[import-not-found]
from openai_adapter.admission import Admission, DurationAverage, decide, expected_wait
from openai_adapter.errors import OpenAIError

COMP = "/v1/completions"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_duration_average_starts_at_first_sample_and_moves_toward_new_ones():
    d = DurationAverage(alpha=0.5)
    assert d.mean is None
    d.observe(4.0)
    assert d.mean == 4.0
    d.observe(2.0)
    assert d.mean == 3.0
    d.observe(-1.0)  # a clock step backwards counts as 0
    assert d.mean == 1.5


def test_expected_wait_counts_from_the_running_sequences_remaining_times():
    spread = [0.25 * k for k in range(1, 17)]  # 16 slots held 4 s, started 0.25 s apart
    assert expected_wait(1, spread, 4.0) == 0.25
    assert expected_wait(4, spread, 4.0) == 1.0
    assert expected_wait(17, spread, 4.0) == 4.25  # the slot freed first, after its next holder
    assert expected_wait(0, spread, 4.0) == 0.0
    together = [4.0] * 16  # a cohort that started at once also ends at once
    assert expected_wait(1, together, 4.0) == 4.0
    assert expected_wait(3, [], 2.0) == 6.0


def rule(**kw):
    base = dict(remaining=[0.25 * k for k in range(1, 17)], queued=0, waiters=0, weight=1, slots=16,
                duration=4.0, max_wait_s=1.0, max_waiting=64)
    return decide(**{**base, **kw})


def test_decide_runs_while_slots_are_free_and_in_order():
    assert rule(remaining=[1.0] * 15).action == "run"
    assert rule(remaining=[], weight=40).action == "run"  # larger than the model: runs alone
    assert rule(remaining=[1.0] * 15, weight=2).action == "wait"
    assert rule(remaining=[1.0] * 10, queued=1, waiters=1).action == "wait"  # someone is first in line


def test_decide_waits_only_while_the_expected_wait_is_under_the_bound():
    # One slot frees every 0.25 s: the 4th in line waits 1 s, the 5th 1.25 s.
    assert (rule(queued=3, waiters=3).action, rule(queued=3, waiters=3).wait_s) == ("wait", 1.0)
    d = rule(queued=4, waiters=4)
    assert d.action == "refuse" and d.wait_s == 1.25 and d.retry_after(7) == 2
    assert rule(queued=3, waiters=2, weight=2).action == "refuse"  # a request of n=2 needs two slots
    assert rule(max_wait_s=0.0).action == "refuse"
    assert rule(remaining=[3.5] * 16).action == "refuse"  # the cohort ahead ends in 3.5 s


def test_decide_refuses_without_an_estimate_and_beyond_max_waiting():
    d = rule(duration=None)
    assert d.action == "refuse" and d.wait_s is None and d.retry_after(3) == 3
    assert rule(remaining=[0.01] * 16, queued=2, waiters=2, max_waiting=2).action == "refuse"
    assert rule(remaining=[0.01] * 16, queued=2, waiters=2, max_waiting=2).retry_after(5) == 1  # at least 1 s


async def test_admission_line_hands_slots_over_in_order_and_learns_durations():
    clock = Clock()
    a = Admission(max_wait_s=10.0, max_waiting=8, clock=clock)
    t1 = await a.acquire("m", slots=2)
    t2 = await a.acquire("m", slots=2)
    with pytest.raises(OpenAIError) as err:  # nothing finished yet: no estimate, no waiting
        await a.acquire("m", slots=2)
    assert err.value.status == 429 and err.value.code == "over_capacity" and err.value.retry_after == 1
    clock.t += 3.0
    a.release(t1)
    assert a.lines["m"].durations.mean == 3.0
    t3 = await a.acquire("m", slots=2)  # the freed slot
    w1 = asyncio.ensure_future(a.acquire("m", slots=2, weight=2))  # waits for both slots
    w2 = asyncio.ensure_future(a.acquire("m", slots=2))
    await asyncio.sleep(0)
    assert (a.in_flight, a.waiting, a.lines["m"].queued) == (2, 2, 3)
    a.release(t2)
    await asyncio.sleep(0)
    assert not w1.done() and not w2.done()  # the head needs two; the one behind it does not jump the line
    a.release(t3)
    t4 = await w1
    assert t4.weight == 2 and a.lines["m"].used == 2 and not w2.done()
    a.release(t4)
    t5 = await w2
    a.release(t5)
    a.release(t5)  # twice changes nothing
    assert (a.in_flight, a.waiting, a.lines["m"].used, a.lines["m"].queued) == (0, 0, 0, 0)


async def test_admission_refuses_with_the_expected_wait_as_retry_after():
    clock = Clock()
    a = Admission(max_wait_s=1.0, max_waiting=64, clock=clock)
    first = await a.acquire("m", slots=4)
    clock.t += 2.0
    a.release(first)  # requests hold their slot 2 s
    tickets = []
    for _ in range(4):  # started 0.5 s apart: they end 0.5 s apart
        tickets.append(await a.acquire("m", slots=4))
        clock.t += 0.5
    clock.t -= 0.5
    waiters = [asyncio.ensure_future(a.acquire("m", slots=4)) for _ in range(2)]  # 0.5 s, 1.0 s
    await asyncio.sleep(0)
    assert a.waiting == 2
    with pytest.raises(OpenAIError) as err:  # the third would wait 1.5 s
        await a.acquire("m", slots=4)
    assert err.value.retry_after == 2 and "1.5 s" in err.value.message
    clock.t += 1.0  # a second later the line has moved on in expectation: the same one would wait 0.5 s
    assert a.decide("m", 4).action == "wait"
    other = await a.acquire("other", slots=4)  # each model has its own slots
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert a.waiting == 0 and a.lines["m"].queued == 0
    for t in tickets + [other]:
        a.release(t)
    assert a.in_flight == 0


async def test_refuse_if_full_raises_what_acquire_would_and_takes_nothing():
    clock = Clock()
    a = Admission(max_wait_s=1.0, max_waiting=64, clock=clock)
    a.refuse_if_full("m", slots=1)  # a slot is free: no answer yet
    first = await a.acquire("m", slots=1)
    with pytest.raises(OpenAIError) as early:  # no estimate yet: beyond the slots it is 429
        a.refuse_if_full("m", slots=1)
    with pytest.raises(OpenAIError) as late:
        await a.acquire("m", slots=1)
    assert (early.value.status, early.value.code, early.value.message) == \
        (late.value.status, late.value.code, late.value.message) == (429, "over_capacity", late.value.message)
    assert (a.in_flight, a.waiting, a.lines["m"].queued) == (1, 0, 0)
    a.release(first)


async def test_admission_waiter_cancelled_just_as_it_got_the_slot_gives_it_back():
    clock = Clock()
    a = Admission(max_wait_s=10.0, max_waiting=8, clock=clock)
    t1 = await a.acquire("m", slots=1)
    a.lines["m"].durations.observe(1.0)
    w = asyncio.ensure_future(a.acquire("m", slots=1))
    await asyncio.sleep(0)
    a.release(t1)  # hands the slot to w ...
    w.cancel()     # ... which is cancelled before it runs
    await asyncio.gather(w, return_exceptions=True)
    assert a.lines["m"].used == 0 and a.in_flight == 0 and a.waiting == 0


async def test_admission_follows_a_model_reloaded_with_more_slots():
    a = Admission(max_wait_s=10.0, max_waiting=8, clock=Clock())
    t1 = await a.acquire("m", slots=1)
    a.lines["m"].durations.observe(1.0)
    w = asyncio.ensure_future(a.acquire("m", slots=1))
    await asyncio.sleep(0)
    assert a.waiting == 1
    t2 = await a.acquire("m", slots=3)  # the line grows to 3 slots: the waiter goes in too
    t3 = await w
    assert a.lines["m"].used == 3
    for t in (t1, t2, t3):
        a.release(t)


# -- the app ------------------------------------------------------------------------
def _fake_with_slots(slots: int) -> FakeClient:
    fake = FakeClient()
    fake.infos["fake"].max_num_seqs = slots  # what the model's Triton config says
    return fake


async def test_app_sizes_admission_to_the_models_slots_and_answers_429_beyond():
    async with app_client(_fake_with_slots(2), max_queue_wait_s=1.0) as (http, fake):
        deps = http.app.state.deps
        assert deps.slots("fake") == 2
        slow = {"model": "fake", "prompt": "[[delay=250]]", "max_tokens": 4, "stream": True}
        running = [asyncio.ensure_future(http.post(COMP, json=slow)) for _ in range(2)]
        await wait_until(lambda: deps.admission.in_flight == 2 and len(fake.requests) == 2,
                         "both slow requests reaching the model")
        r = await http.post(COMP, json={"model": "fake", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "rate_limit_error",
                                     "param": None, "code": "over_capacity"}
        assert len(fake.requests) == 2  # the refused one never reached the model
        assert [(await t).status_code for t in running] == [200, 200]
        assert deps.admission.in_flight == 0 and deps.admission.lines["fake"].durations.mean is not None


async def test_app_lets_a_request_wait_when_its_expected_wait_is_short():
    async with app_client(_fake_with_slots(1), max_queue_wait_s=30.0) as (http, fake):
        deps = http.app.state.deps
        job = {"model": "fake", "prompt": "[[delay=20]]", "max_tokens": 3}
        assert (await http.post(COMP, json=job)).status_code == 200  # an estimate
        first = asyncio.ensure_future(http.post(COMP, json=job))
        await wait_until(lambda: deps.admission.in_flight == 1, "the first running")
        second = await http.post(COMP, json=job)  # waits its turn
        assert second.status_code == 200 and (await first).status_code == 200


async def test_app_counts_sequences_and_runs_a_request_larger_than_the_model_alone():
    async with app_client(_fake_with_slots(2)) as (http, fake):
        admission = http.app.state.deps.admission
        seen: list[int] = []
        acquire = admission.acquire

        async def spy(model, slots, weight=1):
            ticket = await acquire(model, slots, weight)
            seen.append(ticket.weight)
            return ticket

        admission.acquire = spy
        r = await http.post(COMP, json={"model": "fake", "prompt": ["a", "b"], "n": 2, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
        r = await http.post(COMP, json={"model": "fake", "prompt": "a", "n": 2, "max_tokens": 2})
        assert seen == [2, 2]  # 4 sequences take all (both) slots; n=2 takes two
        assert admission.lines["fake"].used == 0


async def test_slots_come_from_settings_or_the_model_never_over_max_in_flight():
    async with app_client(_fake_with_slots(16), max_in_flight=8) as (http, _):
        assert http.app.state.deps.slots("fake") == 8
    async with app_client(_fake_with_slots(16), model_slots=4) as (http, _):
        assert http.app.state.deps.slots("fake") == 4
    async with app_client(FakeClient(), max_in_flight=5) as (http, _):  # the config does not say
        assert http.app.state.deps.slots("fake") == 5
