"""Unit tests of the engine over a fake decoder (no Triton, no ONNX model): the steps of
the scheduler, KV manager and output processor through `EngineCore`, and the production
path around them: the engine thread, the responder thread, cancellation through the
responder's poll, tokenizer workers, unload."""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest
from backend_testlib import (  # type: ignore[import-not-found]
    FakeDecoder,
    FakeMetricFamily,
    GatedTokenizer,
    ListSink,
    RawSender,
    core,
    engine,
    parsed,
    run,
    step,
    wait_until,
)

from llm_backend.error_kinds import RequestError
from llm_backend.prefix_cache import PrefixCache
from llm_backend.protocol import ResponseSink, parse_request
from llm_backend.request import RequestStatus
from llm_backend.responder import Responder
from llm_backend.sampling import SamplingParams

# -- one step at a time ---------------------------------------------------------------------------------


def _alone(prompt, max_tokens):
    c, sink = core(), ListSink()
    c.add_request(prompt, SamplingParams(max_tokens=max_tokens), sink)
    run(c)
    return "".join(sink.pieces)


def test_join_and_leave_between_steps_does_not_change_outputs():
    prompts = [list(range(1, 4 + 3 * i)) for i in range(6)]
    lens = [5, 12, 3, 9, 7, 4]
    expected = [_alone(p, n) for p, n in zip(prompts, lens)]
    c = core(max_queue_size=10)
    sinks = []
    for i, (p, n) in enumerate(zip(prompts, lens)):     # arrive while others run
        sinks.append(ListSink())
        c.add_request(p, SamplingParams(max_tokens=n), sinks[-1])
        step(c)
    run(c)
    assert ["".join(k.pieces) for k in sinks] == expected
    assert [k.end for k in sinks] == [("length", len(p), n) for p, n in zip(prompts, lens)]
    assert c.scheduler.kv.free_slots() == 4


def test_a_request_goes_through_its_statuses():
    c = core(prefill_chunk=8)
    c.add_request(list(range(1, 21)), SamplingParams(max_tokens=3), ListSink())
    c.scheduler.drain_inbox()
    req = c.scheduler.waiting[0]
    seen = [req.status]
    while not c.idle:
        step(c)
        seen.append(req.status)
    S = RequestStatus
    assert seen == [S.WAITING, S.PREFILLING, S.PREFILLING, S.DECODING, S.FINISHED_LENGTH]
    assert req.output and req.finish_reason == "length"


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps():
    dec = FakeDecoder(max_len=128)
    c = core(dec, max_model_len=128)
    first = ListSink()
    c.add_request([1, 2, 3], SamplingParams(max_tokens=30), first)
    step(c)
    c.add_request(list(range(1, 41)), SamplingParams(max_tokens=2), ListSink())
    dec.calls.clear()
    for _ in range(5):
        step(c)
    assert [call for call in dec.calls if call[0] == "prefill"] == [("prefill", 8)] * 5
    assert [call[0] for call in dec.calls] == ["prefill", "decode"] * 5     # the first stream keeps decoding
    assert dec.calls[-1] == ("decode", 2)                                  # the newcomer joined


# -- new prompts prefilled together ----------------------------------------------------------------------
def _together(dec, jobs, **kw):
    """Submit (prompt, max_tokens) jobs at once to a core over `dec`, run them; their texts and ends."""
    c = core(dec, max_queue_size=10, **kw)
    sinks = [ListSink() for _ in jobs]
    for (p, n), sink in zip(jobs, sinks):
        c.add_request(p, SamplingParams(max_tokens=n), sink)
    run(c)
    assert c.scheduler.kv.free_slots() == dec.num_slots and c.scheduler._pending == 0
    return c, [("".join(k.pieces), k.end) for k in sinks]


def test_new_prompts_arriving_together_are_prefilled_in_one_call_and_answer_as_alone():
    # different lengths (right-padded in one call), one ending at its first token: its row
    # is freed under the others, which must still decode from their own rows
    jobs = [(list(range(1, 6)), 6), (list(range(10, 19)), 1), (list(range(30, 33)), 5), (list(range(40, 47)), 4)]
    alone = [(_alone(p, n), ("length", len(p), n)) for p, n in jobs]
    dec = FakeDecoder(batched_prefill=True)
    c, got = _together(dec, jobs, prefill_chunk=64)
    assert got == alone
    assert dec.calls[0] == ("prefill_batch", [5, 9, 3, 7]) and not any(k == "prefill" for k, _ in dec.calls)
    assert c.scheduler.kv.cache.queries == 5 + 9 + 3 + 7         # looked up (the hit rate), none hit
    # the group's prompts went to the prompt cache from their own rows
    again = jobs[1][0][:8] + [55]
    sink = ListSink()
    c.add_request(again, SamplingParams(max_tokens=4), sink)
    run(c)
    assert c.scheduler.kv.cache.hits == 8 and "".join(sink.pieces) == _alone(again, 4)


def test_a_group_takes_the_oldest_prompts_that_fit_the_budget_and_the_free_slots():
    dec = FakeDecoder(batched_prefill=True)
    jobs = [(list(range(1, 7)), 3), (list(range(10, 16)), 3), (list(range(20, 26)), 3), (list(range(30, 36)), 3),
            (list(range(40, 46)), 3)]
    alone = [(_alone(p, n), ("length", len(p), n)) for p, n in jobs]
    c, got = _together(dec, jobs, prefill_chunk=15)              # 6 + 6 fit, a third would not
    assert got == alone
    assert dec.calls[0] == ("prefill_batch", [6, 6]) and dec.calls[1] == ("prefill", 3)   # the rest of the budget
    dec = FakeDecoder(batched_prefill=True)
    c, got = _together(dec, jobs, prefill_chunk=64)              # 4 slots: 4 together, the fifth waits
    assert got == alone and dec.calls[0] == ("prefill_batch", [6] * 4)
    dec = FakeDecoder(batched_prefill=True)
    c, got = _together(dec, jobs, prefill_chunk=64, max_prefill_batch=3)
    assert got == alone and dec.calls[0] == ("prefill_batch", [6] * 3) and dec.calls[1] == ("prefill", 6)
    dec = FakeDecoder(batched_prefill=True)
    c, got = _together(dec, jobs, prefill_chunk=64, max_prefill_batch=1)   # off
    assert got == alone and not any(k == "prefill_batch" for k, _ in dec.calls)


def test_prompts_with_a_cached_or_shared_beginning_are_not_prefilled_together():
    dec = FakeDecoder(batched_prefill=True)
    shared = list(range(1, 9))
    c, got = _together(dec, [(shared + [50, 51], 2), (shared + [60, 61, 62], 2)], prefill_chunk=64)
    assert got == [(_alone(shared + [50, 51], 2), ("length", 10, 2)), (_alone(shared + [60, 61, 62], 2), ("length", 11, 2))]
    assert not any(k == "prefill_batch" for k, _ in dec.calls)
    assert c.scheduler.kv.cache.hits == 8                        # the second reused the first's blocks
    dec.calls.clear()
    sinks = [ListSink(), ListSink()]
    c.add_request(shared + [33], SamplingParams(max_tokens=2), sinks[0])    # cached beginning, oldest
    c.add_request(list(range(40, 50)), SamplingParams(max_tokens=2), sinks[1])
    run(c)
    assert not any(k == "prefill_batch" for k, _ in dec.calls) and c.scheduler.kv.cache.hits == 16


def test_who_gets_a_slot_is_decided_in_one_place_for_lone_and_grouped_prefills(monkeypatch):
    from llm_backend.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "_pick_order", lambda self: list(reversed(self.waiting)))   # newest first
    for batched, first_calls in ((False, [("prefill", 7), ("prefill", 6)]), (True, [("prefill_batch", [7, 6])])):
        dec = FakeDecoder(num_slots=2, batched_prefill=batched)
        c = core(dec, max_queue_size=10, prefill_chunk=64)
        for n in (5, 6, 7):
            c.add_request(list(range(8 * n, 9 * n)), SamplingParams(max_tokens=2), ListSink())
        step(c)
        assert [call for call in dec.calls if call[0] != "decode"] == first_calls
        run(c)


def test_a_failed_group_prefill_fails_its_requests_and_frees_their_slots():
    class Broken(FakeDecoder):
        def prefill_batch(self, first, prompts):
            raise RuntimeError("onnxruntime said no")

    dec = Broken(batched_prefill=True)
    c = core(dec, max_queue_size=10, prefill_chunk=64)
    sinks = [ListSink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        c.add_request(list(range(10 * i + 1, 10 * i + 6)), SamplingParams(max_tokens=3), sink)
    run(c)
    assert [k.error for k in sinks] == [("internal", "prefill failed: onnxruntime said no")] * 3
    assert c.scheduler.kv.free_slots() == 4 and c.scheduler._pending == 0
    later = ListSink()
    c.add_request([1, 2, 3], SamplingParams(max_tokens=3), later)     # alone: the single path
    run(c)
    assert later.end == ("length", 3, 3)


def test_prefix_cache_reuses_blocks_and_gives_the_same_output():
    dec = FakeDecoder()
    c = core(dec)
    prompt = list(range(1, 20))
    outs = []
    for _ in range(2):
        sink = ListSink()
        c.add_request(prompt, SamplingParams(max_tokens=5), sink)
        dec.calls.clear()
        run(c)
        outs.append(("".join(sink.pieces), [call for call in dec.calls if call[0] == "prefill"]))
    assert outs[0][0] == outs[1][0]
    assert sum(n for _, n in outs[0][1]) == 19 and sum(n for _, n in outs[1][1]) == 3
    assert c.scheduler.kv.cache.hits == 16


def test_prefix_cache_evicts_the_tails_of_a_chain_before_its_head():
    """A block is only useful after its whole prefix: evicting a chain's head first
    leaves its tail blocks resident and unreachable."""
    block_bytes = FakeDecoder().read_rows(0, 0, 4).nbytes
    a, b, d = list(range(1, 14)), list(range(20, 25)), list(range(30, 39))   # 3, 1 and 2 blocks

    def blocks_hit(c, prompt):
        cache = c.scheduler.kv.cache
        hits = cache.hits
        c.add_request(prompt, SamplingParams(max_tokens=1), ListSink())
        run(c)
        return (cache.hits - hits) // 4

    c = core(prefix_cache=PrefixCache(3 * block_bytes, block=4))
    blocks_hit(c, a)
    blocks_hit(c, b)                                       # inserted: evicts one block of a
    assert blocks_hit(c, a) == 2

    c = core(prefix_cache=PrefixCache(4 * block_bytes, block=4))
    blocks_hit(c, a)
    blocks_hit(c, b)
    assert blocks_hit(c, a) == 3                           # hit: a is the most recent again
    blocks_hit(c, d)                                       # evicts b and one block of a
    assert blocks_hit(c, a) == 2


def test_a_cancelled_request_is_polled_then_dropped_and_frees_its_row():
    """The one cancellation path: the responder's poll after a step flags the request,
    the next step drops it."""
    c = core()
    a, b = ListSink(), ListSink()
    c.add_request([1, 2], SamplingParams(max_tokens=50), a)
    c.add_request([3, 4], SamplingParams(max_tokens=5), b)
    step(c), step(c)
    a.cancel = True
    step(c)                                               # the poll after this step sees it
    assert a.error is None and len(c.scheduler.decoding) == 2
    step(c)
    assert a.error[0] == "cancelled" and a.end is None
    assert [r.sink for r in c.scheduler.decoding] in ([b], [])
    run(c)
    assert b.end[0] == "length" and c.scheduler.kv.free_slots() == 4


def test_a_request_cancelled_while_it_waits_gives_back_its_queue_place():
    c = core(FakeDecoder(num_slots=1), max_queue_size=1)
    running, waiting = ListSink(), ListSink()
    c.add_request([1, 2], SamplingParams(max_tokens=20), running)
    c.add_request([3, 4], SamplingParams(max_tokens=20), waiting)
    step(c)
    with pytest.raises(RequestError):                     # 1 slot + 1 waiting
        c.add_request([5], SamplingParams(max_tokens=2), ListSink())
    waiting.cancel = True
    step(c), step(c)
    assert waiting.error[0] == "cancelled" and not c.scheduler.waiting
    c.add_request([5], SamplingParams(max_tokens=2), ListSink())   # its place is free again


def test_queue_overflow_is_over_capacity():
    c = core(FakeDecoder(num_slots=1), max_queue_size=2)
    for _ in range(3):                                    # 1 slot + 2 waiting
        c.add_request([1], SamplingParams(max_tokens=3), ListSink())
    with pytest.raises(RequestError) as err:
        c.add_request([1], SamplingParams(max_tokens=3), ListSink())
    assert err.value.kind == "over_capacity" and "max_queue_size 2" in str(err.value)


def test_context_overflow_names_both_numbers():
    c = core()
    with pytest.raises(RequestError) as err:
        c.add_request(list(range(1, 41)), SamplingParams(max_tokens=30), ListSink())
    assert str(err.value).startswith("context_length_exceeded: ") and "64" in str(err.value) and "70" in str(err.value)
    sink = ListSink()                                     # absent max_tokens: up to the limit
    c.add_request(list(range(1, 41)), SamplingParams(ignore_eos=True), sink)
    run(c)
    assert sink.end == ("length", 40, 24)


def test_eos_ends_with_stop_unless_ignored():
    class EosDecoder(FakeDecoder):
        def _logits(self, history):
            lg = np.zeros(64, dtype=np.float32)
            lg[0 if len(history) >= 5 else 41] = 10.0
            return lg
    sink = ListSink()
    c = core(EosDecoder())
    c.add_request([1, 2, 3], SamplingParams(max_tokens=10), sink)
    run(c)
    assert sink.end == ("stop", 3, 2)
    sink = ListSink()
    c.add_request([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), sink)
    run(c)
    assert sink.end == ("length", 3, 4)


def test_generated_tokens_metric_agrees_with_num_output_tokens():
    """EOS ends a sequence but is not an output token: llm_generation_tokens_total
    counted it (and its inter-token gap), so it ran ahead of the usage reported."""
    from llm_backend.metrics import TritonMetrics

    class EosDecoder(FakeDecoder):                         # EOS once a row holds 5 tokens
        def _logits(self, history):
            lg = np.zeros(64, dtype=np.float32)
            lg[0 if len(history) >= 5 else 41] = 10.0
            return lg

    m = TritonMetrics(types.SimpleNamespace(MetricFamily=FakeMetricFamily), {"model": "m"})
    c = core(EosDecoder(), metrics=m, max_queue_size=10)
    sinks = [ListSink() for _ in range(4)]
    c.add_request([1, 2, 3], SamplingParams(max_tokens=10), sinks[0])          # 2 tokens, then EOS
    c.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=10), sinks[1])    # EOS first: 0 tokens
    c.add_request([1, 2], SamplingParams(max_tokens=2), sinks[2])              # length: 2 tokens
    c.add_request([1, 2], SamplingParams(max_tokens=10, stop=[")"]), sinks[3])  # stop string: 1 token
    run(c)
    outputs = [k.end[2] for k in sinks]
    assert outputs == [2, 0, 2, 1]
    assert m.gen.value == sum(outputs)
    assert m.prompt.value == 3 + 5 + 2 + 2
    assert len(m.ttft.observed) == 4
    assert len(m.itl.observed) == sum(outputs) - sum(1 for n in outputs if n)   # between tokens


class _ScriptDecoder(FakeDecoder):
    """After a 2-token prompt, the characters of `script` one by one, then EOS (the
    vocabulary is 64 bytes: digits and punctuation)."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    def _logits(self, history):
        lg = np.zeros(64, dtype=np.float32)
        i = len(history) - 2
        lg[ord(self.script[i]) if i < len(self.script) else 0] = 10.0
        return lg


def _streamed(dec, interval, **params):
    c = core(dec, stream_interval=interval, max_queue_size=10)
    sink = ListSink()
    c.add_request([1, 2], SamplingParams(**params), sink)
    run(c)
    return sink


def test_streamed_pieces_carry_the_running_token_counts():
    """So a client that leaves after k pieces can be billed what was generated, also
    the tokens whose text a stop string held back."""
    c = core(max_queue_size=10)
    sink = ListSink()
    c.add_request([1, 2, 3], SamplingParams(max_tokens=6), sink)
    run(c)
    assert sink.counts == [(3, k) for k in range(1, 6)] and sink.end == ("length", 3, 6)

    sink = _streamed(_ScriptDecoder("!%%!%%%"), 1, max_tokens=10, stop=["%%%"])
    assert sink.pieces == ["!", "%%!", ""]
    assert sink.counts == [(2, 1), (2, 4)] and sink.end == ("stop", 2, 7)


def test_stream_interval_sends_the_first_piece_at_once_then_one_per_n_tokens():
    """Time to first token is not traded: only the pieces after the first are grouped.
    What is held when the request ends (length, stop string, EOS) goes with the last
    response, and the text is the same as token by token."""
    every = _streamed(_ScriptDecoder("0123456789"), 1, max_tokens=7)
    assert every.pieces == ["0", "1", "2", "3", "4", "5", "6"]
    four = _streamed(_ScriptDecoder("0123456789"), 4, max_tokens=7)
    assert four.pieces == ["0", "1234", "56"]                           # two held at the length
    assert four.counts == [(2, 1), (2, 5)] and four.end == ("length", 2, 7)

    stop = _streamed(_ScriptDecoder("012345%%%6789"), 4, max_tokens=20, stop=["%%%"])
    assert stop.pieces == ["0", "1234", "5"] and stop.end == ("stop", 2, 9)   # "5" held at the stop
    held = _streamed(_ScriptDecoder("0%%1%%%"), 2, max_tokens=20, stop=["%%%"])
    assert held.pieces == ["0", "%%1", ""]                              # "%%" held for the stop first
    assert held.counts == [(2, 1), (2, 4)] and held.end == ("stop", 2, 7)

    eos = _streamed(_ScriptDecoder("))))"), 4, max_tokens=10)
    assert eos.pieces == [")", ")))"] and eos.end == ("stop", 2, 4)     # EOS ends it with 3 held


def test_stream_interval_holds_text_at_most_max_hold_s():
    """A slow model still streams (and stays under the adapter's silence probe)."""
    from llm_backend.output_processor import OutputProcessor

    now = [0.0]
    c = core(_ScriptDecoder("0123456789"), stream_interval=100, max_queue_size=10)
    c.outputs.clock = lambda: now[0]
    sink = ListSink()
    c.add_request([1, 2], SamplingParams(max_tokens=10), sink)
    for _ in range(4):                         # "0" (prefilled) sent; "1" (same step) to "4" held
        step(c)
    assert sink.pieces == ["0"]
    now[0] = OutputProcessor.MAX_HOLD_S
    step(c)                                    # "5": the held text has waited long enough
    run(c)
    assert sink.pieces == ["0", "12345", "6789"]


def test_abort_all_reports_the_emptied_state():
    """After a failed engine step everything in flight is failed and the engine goes
    idle: no further step reports the state, so the gauges kept the old counts."""
    class StateMetrics:
        def __init__(self):
            self.last = None

        def state(self, waiting, running, kv_usage):
            self.last = (waiting, running, kv_usage)

        def first_token(self, seconds, prompt_tokens, generated):
            pass

        def tokens(self, n, inter_token_seconds):
            pass

    m = StateMetrics()
    c = core(metrics=m, max_queue_size=10)
    sinks = [ListSink() for _ in range(6)]
    for i, sink in enumerate(sinks):
        c.add_request([1, 2, 3 + i], SamplingParams(max_tokens=20), sink)
    step(c)
    assert m.last[1] > 0 and m.last[0] > 0
    c.abort_all("internal", "engine step failed")
    c.outbox.run_pending()
    assert c.idle and all(k.error for k in sinks)
    assert m.last == (0, 0, 0.0) and c.scheduler._pending == 0


# -- the production path: engine thread, responder thread ------------------------------------------------


class SlowDecoder(FakeDecoder):
    """Each model call takes a while with the GIL released, as onnxruntime's do."""

    def __init__(self, delay=0.01, **kw):   # 40 tokens take 0.4 s: room for the test thread on loaded cores
        super().__init__(**kw)
        self.delay = delay

    def decode(self, tokens, lengths):
        time.sleep(self.delay)
        return super().decode(tokens, lengths)


def test_a_client_that_leaves_mid_stream_is_dropped_through_the_responder(triton_sender):
    """Through Triton's sender: the responder's poll sees the client gone, the engine
    drops the request at its next step, frees its slot and ends it with the bare final
    flag; the stream beside it is not disturbed."""
    e = engine(dec=SlowDecoder())
    try:
        raw = RawSender()
        req = parsed("12", max_tokens=np.int32(40), ignore_eos=True, stream=True)
        e.submit(req, ResponseSink(triton_sender(raw), req))
        staying = ListSink()
        e.submit(parsed("34", max_tokens=np.int32(30), ignore_eos=True), staying)
        wait_until(lambda: len(raw.sent) >= 3, what="three pieces")
        raw.cancelled = True
        wait_until(lambda: raw.sent[-1] == (None, 1), what="the final flag")
        assert all(flags == 0 and "error" not in r for r, flags in raw.sent[:-1])
        assert len(raw.sent) < 40                           # it left long before its end
        wait_until(lambda: staying.end is not None, what="the other stream")
        assert staying.end == ("length", 2, 30) and "".join(staying.pieces) == _alone([51, 52], 30)
        wait_until(lambda: e.core.idle, what="idle")
        assert e.core.scheduler.kv.free_slots() == 4 and e.core.scheduler._pending == 0
    finally:
        e.close(drain_timeout=5)


def test_the_responder_sends_in_order_and_survives_a_failing_send():
    r = Responder()
    got = []

    def boom():
        raise RuntimeError("the client's stream broke")

    for i in range(50):
        r.send(got.append, i)
        if i == 10:
            r.send(boom)
    r.close()
    assert got == list(range(50))


def test_the_responder_queues_one_cancellation_poll_at_a_time():
    r = Responder(start=False)
    sink = ListSink()
    req = types.SimpleNamespace(sink=sink, cancelled=False)
    r.poll_cancelled([req])
    r.poll_cancelled([req])                                # skipped: one is queued
    assert r.q.qsize() == 1
    sink.cancel = True
    r.run_pending()
    assert req.cancelled
    r.poll_cancelled([req])
    assert r.q.qsize() == 1                                # the next step queues a new one


def test_cancellation_polls_are_spaced_by_the_poll_interval():
    """Each poll is an IPC round trip per request: at most one every poll_interval, however
    fast the engine steps; a client that left is still seen at the next one."""
    now = [100.0]
    r = Responder(start=False, poll_interval=0.05, clock=lambda: now[0])
    sink = ListSink()
    req = types.SimpleNamespace(sink=sink, cancelled=False)
    r.poll_cancelled([req])
    r.run_pending()
    sink.cancel = True
    for _ in range(10):                                    # steps within 50 ms: no poll
        now[0] += 0.004
        r.poll_cancelled([req])
    assert r.q.qsize() == 0 and not req.cancelled
    now[0] += 0.011
    r.poll_cancelled([req])
    r.run_pending()
    assert req.cancelled


def test_a_failed_engine_step_fails_what_is_in_flight_and_the_engine_serves_on():
    class BrokenOnce(SlowDecoder):
        broken = True

        def decode(self, tokens, lengths):
            out = super().decode(tokens, lengths)
            if self.broken and len(tokens) == 3:           # once all three decode together
                self.broken = False
                return out[:0]                              # an engine bug: fails outside the model call
            return out

    e = engine(dec=BrokenOnce())
    try:
        first = [ListSink() for _ in range(3)]
        for i, sink in enumerate(first):
            e.submit(parsed(f"1{i}", max_tokens=np.int32(40)), sink)
        wait_until(lambda: all(k.error for k in first), what="the failed requests")
        assert all(k.error[0] == "internal" and "engine step failed" in k.error[1] for k in first)
        later = ListSink()
        e.submit(parsed("7", max_tokens=np.int32(5)), later)
        wait_until(lambda: later.end is not None, what="a request after the failure")
        assert later.end == ("length", 1, 5) and e.core.scheduler._pending == 0
    finally:
        e.close(drain_timeout=5)


def test_unload_lets_running_requests_finish_and_refuses_new_ones():
    e = engine(dec=SlowDecoder())
    sink = ListSink()
    e.submit(parsed("12", max_tokens=np.int32(20)), sink)
    wait_until(lambda: sink.pieces, what="the first piece")
    closer = threading.Thread(target=e.close, kwargs={"drain_timeout": 10})
    closer.start()
    wait_until(lambda: e.closed, what="closing")
    with pytest.raises(RequestError, match="unloading"):
        e.submit(parsed("3"), ListSink())
    closer.join(30)
    assert sink.end == ("length", 2, 20) and sink.error is None


# -- tokenizing off the engine loop ----------------------------------------------------------------------


def test_the_engine_keeps_stepping_while_a_prompt_is_tokenized():
    """A prompt is tokenized by a worker, never on the engine thread (nor Triton's): a
    request that arrives later is prefilled and decoded to its end while the first
    one's tokenizer is still at work."""
    tok = GatedTokenizer()
    e = engine(tok)
    decodes = lambda: sum(1 for call in e.core.dec.calls if call[0] == "decode")  # noqa: E731
    try:
        running, slow = ListSink(), ListSink()
        e.submit(parsed("## 345", max_tokens=np.int32(3)), slow)    # returns at once
        assert tok.entered.wait(10)
        e.submit(parsed("12", max_tokens=np.int32(40), ignore_eos=True), running)
        wait_until(lambda: running.end is not None, what="the later request to finish")
        assert running.end == ("length", 2, 40) and len(running.counts) == 39
        assert decodes() == 39                                # every step ran while tokenizing
        assert not tok.gate.is_set() and slow.end is None and slow.error is None
        wait_until(lambda: e.pre.busy == 1, what="the worker that queued the later request")
        assert e.core.scheduler._pending == 1                 # the slow one: reserved, not yet queued
        tok.gate.set()
        wait_until(lambda: slow.end is not None, what="the slow prompt's request to finish")
        assert slow.end == ("length", len("## 345"), 3)
    finally:
        tok.gate.set()
        e.close(drain_timeout=5)
    assert e.pre.busy == 0 and e.core.scheduler._pending == 0


def test_a_prompt_over_the_character_bound_is_refused_before_tokenizing():
    """At most 3 characters a token and 64 tokens of context: 193 characters cannot fit."""
    from backend_testlib import ByteTokenizer  # type: ignore[import-not-found]

    class Counting(ByteTokenizer):
        calls = 0

        def encode_batch_fast(self, texts, add_special_tokens=False):
            Counting.calls += 1
            return super().encode_batch_fast(texts, add_special_tokens)

    e = engine(Counting(), chars_per_token=3)
    try:
        with pytest.raises(RequestError) as err:
            e.submit(parsed("x" * 193), ListSink())
        msg = str(err.value)
        assert msg.startswith("context_length_exceeded: ") and err.value.kind == "context_length_exceeded"
        assert "193 characters" in msg and "192" in msg and "64 tokens" in msg
        assert Counting.calls == 0 and e.core.scheduler._pending == 0

        sink = ListSink()                                 # under the bound: tokenized, then the exact check
        e.submit(parsed("x" * 192), sink)
        wait_until(lambda: sink.error is not None, what="the exact check")
        assert sink.error[0] == "context_length_exceeded" and "192 tokens" in sink.error[1]
        assert Counting.calls == 1

        def ids(n):
            return parse_request(lambda name: np.arange(1, n + 1)[None] if name == "input_ids" else None, 256)

        with pytest.raises(RequestError, match="the prompt has 64 tokens"):   # ids: counted, never decoded
            e.submit(ids(64), ListSink())
        ok = ListSink()
        e.submit(ids(10), ok)
        wait_until(lambda: ok.end is not None, what="the ids request")
        assert ok.end[1] == 10
    finally:
        e.close(drain_timeout=5)
    assert e.core.scheduler._pending == 0


def test_a_request_cancelled_while_tokenized_ends_with_the_bare_final_flag(triton_sender):
    """It never reaches the scheduler; its slot reservation is given back."""
    tok = GatedTokenizer()
    e = engine(tok)
    try:
        raw = RawSender()
        req = parsed("## 6 7 8", max_tokens=np.int32(5))
        e.submit(req, ResponseSink(triton_sender(raw), req))
        assert tok.entered.wait(10)
        raw.cancelled = True                              # the client leaves mid-tokenization
        tok.gate.set()
        wait_until(lambda: raw.sent, what="the final flag")
        wait_until(lambda: e.pre.busy == 0, what="the worker to finish")
        assert raw.sent == [(None, 1)]
        assert e.core.scheduler._pending == 0 and e.core.idle
        assert not [call for call in e.core.dec.calls if call[0] == "prefill"]
        assert req.text is None                           # the prompt is not kept
    finally:
        tok.gate.set()
        e.close(drain_timeout=5)


def test_unload_while_a_prompt_is_tokenized_ends_every_request():
    tok = GatedTokenizer()
    e = engine(tok)
    slow, queued = ListSink(), ListSink()
    e.submit(parsed("## 9", max_tokens=np.int32(2)), slow)
    e.submit(parsed("## 10", max_tokens=np.int32(2)), queued)     # the second worker's
    assert tok.entered.wait(10)
    closer = threading.Thread(target=e.close, kwargs={"drain_timeout": 0.2})
    closer.start()
    wait_until(lambda: e.closed, what="closing")
    with pytest.raises(RequestError, match="unloading"):
        e.submit(parsed("11"), ListSink())
    tok.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    for sink in (slow, queued):
        assert sink.end is not None or sink.error is not None
    assert e.core.scheduler._pending == 0
