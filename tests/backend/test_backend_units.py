"""Unit tests of the backend's plain modules (no Triton, no ONNX model)."""

from __future__ import annotations

import numpy as np
import pytest

from llm_backend.detokenizer import IncrementalDetokenizer, StopStringBuffer
from llm_backend.decoder import int8_gemm_is_exact
from llm_backend.prefix_cache import PrefixCache
from llm_backend.protocol import ResponseSink, parse_request
from llm_backend.sampling import Sampler, SamplingParams
from llm_backend.scheduler import RequestError, Scheduler

# -- sampling ----------------------------------------------------------------------------------


def _logits(vocab=1000, seed=0):
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32) * 3


def test_greedy_by_default_and_at_temperature_zero():
    lg = _logits()
    assert SamplingParams().greedy
    assert Sampler(SamplingParams(), 1000)(lg)[0] == int(lg.argmax())
    assert Sampler(SamplingParams(temperature=0.0, top_p=0.5), 1000)(lg)[0] == int(lg.argmax())
    assert Sampler(SamplingParams(temperature=1.0, top_k=1), 1000)(lg)[0] == int(lg.argmax())
    assert not SamplingParams(top_p=0.9).greedy       # top-p without temperature samples at 1


def test_same_seed_same_tokens_and_seeds_differ():
    lg = _logits()
    draw = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed), 1000)(lg)[0] for _ in range(1)]  # noqa: E731
    s1 = Sampler(SamplingParams(temperature=1.0, seed=7), 1000)
    s2 = Sampler(SamplingParams(temperature=1.0, seed=7), 1000)
    assert [s1(lg)[0] for _ in range(20)] == [s2(lg)[0] for _ in range(20)]
    s3 = Sampler(SamplingParams(temperature=1.0, seed=8), 1000)
    assert [s3(lg)[0] for _ in range(20)] != [Sampler(SamplingParams(temperature=1.0, seed=7), 1000)(lg)[0]
                                              for _ in range(20)] or draw(1)


def test_top_k_and_top_p_restrict_the_candidates():
    lg = _logits()
    order = np.argsort(-lg)
    s = Sampler(SamplingParams(temperature=1.5, top_k=5, seed=1), 1000)
    assert {s(lg)[0] for _ in range(200)} <= set(order[:5].tolist())
    probs = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    nucleus = int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1), 1000)
    seen = {s(lg)[0] for _ in range(300)}
    assert seen <= set(order[:nucleus].tolist()) and len(seen) > 1


def test_top_p_over_a_large_vocabulary_matches_the_exact_nucleus():
    lg = np.random.default_rng(3).normal(size=49152).astype(np.float32)   # flat: nucleus is wide
    order = np.argsort(-lg)
    probs = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    nucleus = set(order[:int(np.searchsorted(np.cumsum(probs[order]), 0.3)) + 1].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.3, seed=2), 49152)
    assert {s(lg)[0] for _ in range(100)} <= nucleus


def test_presence_and_frequency_penalties_push_repeats_down():
    lg = np.zeros(10, dtype=np.float32)
    lg[3] = 1.0
    s = Sampler(SamplingParams(temperature=0.0, presence_penalty=2.0), 10)
    assert [s(lg)[0] for _ in range(2)] == [3, 0]        # 3 now at -1: argmax moves on
    s = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.6), 10)
    assert [s(lg)[0] for _ in range(3)] == [3, 3, 0]     # 1 - 0.6 > 0, 1 - 1.2 < 0


def test_logprob_is_of_the_raw_distribution():
    lg = _logits(50)
    tok, lp = Sampler(SamplingParams(logprobs=True), 50)(lg)
    ref = lg[tok] - np.log(np.exp(lg.astype(np.float64)).sum())
    assert lp == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 1.5), ("top_k", -2),
                                         ("presence_penalty", 3.0), ("max_tokens", 0)])
def test_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


# -- detokenizer and stop strings ------------------------------------------------------------------


class ByteTokenizer:
    """Each token is one UTF-8 byte (ids 0-255), decoded like a byte-level BPE."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def encode(self, text, add_special_tokens=False):
        class E:
            ids = list(text.encode())
        return E()

    def encode_batch_fast(self, texts, add_special_tokens=False):
        return [self.encode(t) for t in texts]

    def decode_batch(self, batch, skip_special_tokens=True):
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def test_incremental_detokenizer_never_splits_a_character():
    text = "añ 日本 🌊!"
    d = IncrementalDetokenizer(ByteTokenizer(), prompt_ids=list(b"hi "))
    pieces = [d.push(b) for b in text.encode()]
    pieces.append(d.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces                    # the multi-byte characters were held


def test_incremental_detokenizer_flushes_an_incomplete_tail():
    d = IncrementalDetokenizer(ByteTokenizer())
    assert d.push("日".encode()[0]) == ""
    assert d.flush() == "\ufffd"


def _run_stops(stops, pieces):
    buf = StopStringBuffer(stops)
    out = [buf.push(p) for p in pieces]
    if not buf.stopped:
        out.append(buf.flush())
    return out, buf.stopped


def test_stop_string_across_pieces_is_cut_and_held_back():
    out, stopped = _run_stops(["###"], ["Hello", " #", "#", "# world"])
    assert stopped and "".join(out) == "Hello "
    assert out[1] == " "                   # "#" held: it could start "###"


def test_text_that_was_not_a_stop_is_released():
    out, stopped = _run_stops(["###"], ["a #", "# b", " c"])
    assert not stopped and "".join(out) == "a ## b c"
    out, stopped = _run_stops(["END"], ["The E", "N"])          # ends while held
    assert not stopped and "".join(out) == "The EN"


def test_earliest_of_several_stops_wins():
    out, stopped = _run_stops(["world", "lo w"], ["Hello world"])
    assert stopped and "".join(out) == "Hel"


# -- prefix cache ---------------------------------------------------------------------------------


def test_prefix_cache_hits_whole_blocks_and_leaves_one_token():
    cache = PrefixCache(10 * 2**20, block=4)
    prompt = list(range(10))
    blocks = cache.missing(prompt)
    assert [i for i, _ in blocks] == [0, 1]
    for i, key in blocks:
        cache.insert(key, np.full((1, 2, 1, 4, 1), i, dtype=np.float32))
    assert len(cache.lookup(prompt)) == 2
    assert len(cache.lookup(list(range(8)))) == 1          # 8 tokens: keep one to compute
    assert cache.lookup([99] + prompt[1:]) == []           # different first block: no hit


def test_prefix_cache_evicts_least_recently_used():
    one = np.zeros((1, 2, 1, 4, 1), dtype=np.float32)
    cache = PrefixCache(2 * one.nbytes, block=4)
    a, b, c = [list(range(s, s + 5)) for s in (0, 100, 200)]
    for p in (a, b):
        cache.insert(cache.missing(p)[0][1], one.copy())
    cache.lookup(a)                                        # a is now the most recent
    cache.insert(cache.missing(c)[0][1], one.copy())
    assert cache.lookup(a) and not cache.lookup(b) and cache.lookup(c)


def test_prefix_cache_insert_of_a_present_block_counts_its_bytes_once():
    one = np.zeros((1, 2, 1, 4, 1), dtype=np.float32)
    cache = PrefixCache(10 * one.nbytes, block=4)
    (_, key), = cache.missing(list(range(5)))
    cache.insert(key, one.copy())
    cache.insert(key, one.copy())
    assert cache.used == one.nbytes and len(cache.blocks) == 1


def test_prefix_cache_refuses_a_hit_whose_tokens_differ(monkeypatch):
    """Keys are hashes: a collision must not hand one prompt another prompt's KV."""
    import llm_backend.prefix_cache as prefix_cache

    monkeypatch.setattr(prefix_cache, "_block_hash", lambda parent, tokens: b"\0" * 32)
    cache = PrefixCache(10 * 2**20, block=4)
    a, b = list(range(9)), list(range(10, 19))
    for i, key in cache.missing(a):
        cache.insert(key, np.full((1, 2, 1, 4, 1), i, dtype=np.float32))
    assert len(cache.lookup(a)) == 1                       # every block has the same key: only the first fits
    assert cache.lookup(b) == []                           # same key, other tokens: no hit


def test_prefix_cache_evicts_the_tails_of_a_chain_before_its_head():
    """A block is only useful after its whole prefix: evicting a chain's head first
    leaves its tail blocks resident and unreachable."""
    block_bytes = FakeDecoder().read_rows(0, 0, 4).nbytes
    a, b, c = list(range(1, 14)), list(range(20, 25)), list(range(30, 39))   # 3, 1 and 2 blocks

    def blocks_hit(s, prompt):
        hits = s.cache.hits
        s.submit(prompt, SamplingParams(max_tokens=1), ListSink())
        _run(s)
        return (s.cache.hits - hits) // 4

    s = _sched(prefix_cache=PrefixCache(3 * block_bytes, block=4))
    blocks_hit(s, a)
    blocks_hit(s, b)                                       # inserted: evicts one block of a
    assert blocks_hit(s, a) == 2

    s = _sched(prefix_cache=PrefixCache(4 * block_bytes, block=4))
    blocks_hit(s, a)
    blocks_hit(s, b)
    assert blocks_hit(s, a) == 3                           # hit: a is the most recent again
    blocks_hit(s, c)                                       # evicts b and one block of a
    assert blocks_hit(s, a) == 2


# -- scheduler over a fake decoder -------------------------------------------------------------------


class FakeSpec:
    vocab_size = 64
    eos_token_ids = [0]


class FakeDecoder:
    """Rows hold the token history; the next token is a function of the whole row, so
    any KV mix-up (wrong row after a move, stale positions) changes the output."""

    def __init__(self, num_slots=4, max_len=64):
        self.spec = FakeSpec()
        self.num_slots, self.max_len = num_slots, max_len
        self.kv = [[None] * max_len for _ in range(num_slots)]
        self.calls = []

    def _logits(self, history):
        lg = np.zeros(self.spec.vocab_size, dtype=np.float32)
        lg[1 + (sum(history) * 7 + len(history)) % (self.spec.vocab_size - 1)] = 10.0
        return lg

    def prefill(self, row, tokens, past_len):
        assert all(t is not None for t in self.kv[row][:past_len])
        self.kv[row][past_len:past_len + len(tokens)] = list(tokens)
        self.calls.append(("prefill", len(tokens)))
        return self._logits(self.kv[row][:past_len + len(tokens)])

    def decode(self, tokens, lengths):
        self.calls.append(("decode", len(tokens)))
        out = []
        for i, (t, n) in enumerate(zip(tokens, lengths)):
            self.kv[i][n] = int(t)
            out.append(self._logits(self.kv[i][:n + 1]))
        return np.stack(out)

    def move_row(self, src, dst, length):
        self.kv[dst][:length] = self.kv[src][:length]

    def read_rows(self, row, start, stop):
        return np.array(self.kv[row][start:stop], dtype=np.float32).reshape(1, 1, 1, -1, 1)

    def write_rows(self, row, start, block):
        self.kv[row][start:start + block.shape[3]] = [int(x) for x in block.reshape(-1)]


class ListSink:
    def __init__(self):
        self.pieces, self.end, self.error, self.cancel = [], None, None, False
        self.counts = []                   # (num_input_tokens, num_output_tokens) of each piece

    def is_cancelled(self):
        return self.cancel

    def piece(self, text, logprobs, n_in, n_out):
        self.pieces.append(text)
        self.counts.append((n_in, n_out))

    def finish(self, text, logprobs, reason, n_in, n_out):
        self.pieces.append(text)
        self.end = (reason, n_in, n_out)

    def fail(self, kind, message):
        self.error = (kind, message)


def _sched(dec=None, **kw):
    opts = dict(max_model_len=64, max_queue_size=2, prefill_chunk=8, prefix_cache=PrefixCache(2**20, block=4))
    opts.update(kw)
    return Scheduler(dec or FakeDecoder(), ByteTokenizer(), **opts)


def _run(sched, steps=500):
    for _ in range(steps):
        if sched.idle:
            return
        sched.step()
    raise AssertionError("scheduler did not finish")


def _alone(prompt, max_tokens):
    s, sink = _sched(), ListSink()
    s.submit(prompt, SamplingParams(max_tokens=max_tokens), sink)
    _run(s)
    return "".join(sink.pieces)


def test_join_and_leave_between_steps_does_not_change_outputs():
    prompts = [list(range(1, 4 + 3 * i)) for i in range(6)]
    lens = [5, 12, 3, 9, 7, 4]
    expected = [_alone(p, n) for p, n in zip(prompts, lens)]
    s = _sched(max_queue_size=10)
    sinks = []
    for i, (p, n) in enumerate(zip(prompts, lens)):     # arrive while others run
        sinks.append(ListSink())
        s.submit(p, SamplingParams(max_tokens=n), sinks[-1])
        s.step()
    _run(s)
    assert ["".join(k.pieces) for k in sinks] == expected
    assert [k.end for k in sinks] == [("length", len(p), n) for p, n in zip(prompts, lens)]
    assert s.free_rows() == 4


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps():
    dec = FakeDecoder(max_len=128)
    s = _sched(dec, max_model_len=128)
    first = ListSink()
    s.submit([1, 2, 3], SamplingParams(max_tokens=30), first)
    s.step()
    s.submit(list(range(1, 41)), SamplingParams(max_tokens=2), ListSink())
    dec.calls.clear()
    for _ in range(5):
        s.step()
    assert [c for c in dec.calls if c[0] == "prefill"] == [("prefill", 8)] * 5
    assert [c[0] for c in dec.calls] == ["prefill", "decode"] * 5     # the first stream keeps decoding
    assert dec.calls[-1] == ("decode", 2)                               # the newcomer joined


def test_prefix_cache_reuses_blocks_and_gives_the_same_output():
    dec = FakeDecoder()
    s = _sched(dec)
    prompt = list(range(1, 20))
    outs = []
    for _ in range(2):
        sink = ListSink()
        s.submit(prompt, SamplingParams(max_tokens=5), sink)
        dec.calls.clear()
        _run(s)
        outs.append(("".join(sink.pieces), [c for c in dec.calls if c[0] == "prefill"]))
    assert outs[0][0] == outs[1][0]
    assert sum(n for _, n in outs[0][1]) == 19 and sum(n for _, n in outs[1][1]) == 3
    assert s.cache.hits == 16


def test_cancelled_request_leaves_at_the_next_step_and_frees_its_row():
    s = _sched()
    a, b = ListSink(), ListSink()
    s.submit([1, 2], SamplingParams(max_tokens=50), a)
    s.submit([3, 4], SamplingParams(max_tokens=5), b)
    s.step(), s.step()
    a.cancel = True
    s.step()
    assert a.error[0] == "cancelled" and len(s.rows) <= 1
    _run(s)
    assert b.end[0] == "length" and s.free_rows() == 4


def test_queue_overflow_is_over_capacity():
    s = _sched(FakeDecoder(num_slots=1), max_queue_size=2)
    for _ in range(3):                                    # 1 slot + 2 waiting
        s.submit([1], SamplingParams(max_tokens=3), ListSink())
    with pytest.raises(RequestError) as err:
        s.submit([1], SamplingParams(max_tokens=3), ListSink())
    assert err.value.kind == "over_capacity" and "max_queue_size 2" in str(err.value)


def test_context_overflow_names_both_numbers():
    s = _sched()
    with pytest.raises(RequestError) as err:
        s.submit(list(range(1, 41)), SamplingParams(max_tokens=30), ListSink())
    assert str(err.value).startswith("context_length_exceeded: ") and "64" in str(err.value) and "70" in str(err.value)
    sink = ListSink()                                     # absent max_tokens: up to the limit
    s.submit(list(range(1, 41)), SamplingParams(ignore_eos=True), sink)
    _run(s)
    assert sink.end == ("length", 40, 24)


def test_eos_ends_with_stop_unless_ignored():
    class EosDecoder(FakeDecoder):
        def _logits(self, history):
            lg = np.zeros(64, dtype=np.float32)
            lg[0 if len(history) >= 5 else 65 - 64 + 40] = 10.0
            return lg
    sink = ListSink()
    s = _sched(EosDecoder())
    s.submit([1, 2, 3], SamplingParams(max_tokens=10), sink)
    _run(s)
    assert sink.end == ("stop", 3, 2)


class FakeMetricFamily:
    """pb_utils.MetricFamily: each metric keeps its value and observations."""
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"

    class Metric:
        def __init__(self, labels, buckets=None):
            self.value, self.observed = 0, []

        def set(self, value):
            self.value = value

        def increment(self, n):
            self.value += n

        def observe(self, value):
            self.observed.append(value)

    def __init__(self, name, description, kind):
        self.name = name


def test_generated_tokens_metric_agrees_with_num_output_tokens():
    """EOS ends a sequence but is not an output token: llm_generation_tokens_total
    counted it (and its inter-token gap), so it ran ahead of the usage reported."""
    import types

    from llm_backend.metrics import TritonMetrics

    class EosDecoder(FakeDecoder):                         # EOS once a row holds 5 tokens
        def _logits(self, history):
            lg = np.zeros(64, dtype=np.float32)
            lg[0 if len(history) >= 5 else 41] = 10.0
            return lg

    m = TritonMetrics(types.SimpleNamespace(MetricFamily=FakeMetricFamily), {"model": "m"})
    s = _sched(EosDecoder(), metrics=m, max_queue_size=10)
    sinks = [ListSink() for _ in range(4)]
    s.submit([1, 2, 3], SamplingParams(max_tokens=10), sinks[0])          # 2 tokens, then EOS
    s.submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=10), sinks[1])    # EOS first: 0 tokens
    s.submit([1, 2], SamplingParams(max_tokens=2), sinks[2])              # length: 2 tokens
    s.submit([1, 2], SamplingParams(max_tokens=10, stop=[")"]), sinks[3])               # stop string: 1 token
    _run(s)
    outputs = [k.end[2] for k in sinks]
    assert outputs == [2, 0, 2, 1]
    assert m.gen.value == sum(outputs)
    assert m.prompt.value == 3 + 5 + 2 + 2
    assert len(m.ttft.observed) == 4
    assert len(m.itl.observed) == sum(outputs) - sum(1 for n in outputs if n)   # between tokens


def test_streamed_pieces_carry_the_running_token_counts():
    """So a client that leaves after k pieces can be billed what was generated, also
    the tokens whose text a stop string held back."""
    class ScriptDecoder(FakeDecoder):                      # after a 2-token prompt: "!%%!%%%"
        def _logits(self, history):
            lg = np.zeros(64, dtype=np.float32)
            lg[ord("!%%!%%%"[len(history) - 2])] = 10.0
            return lg

    s = _sched(max_queue_size=10)
    sink = ListSink()
    s.submit([1, 2, 3], SamplingParams(max_tokens=6), sink)
    _run(s)
    assert sink.counts == [(3, k) for k in range(1, 6)] and sink.end == ("length", 3, 6)

    s = _sched(ScriptDecoder())
    sink = ListSink()
    s.submit([1, 2], SamplingParams(max_tokens=10, stop=["%%%"]), sink)
    _run(s)
    assert sink.pieces == ["!", "%%!", ""]
    assert sink.counts == [(2, 1), (2, 4)] and sink.end == ("stop", 2, 7)


# -- request parsing and responses --------------------------------------------------------------------


class RecordingSender:
    def __init__(self):
        self.sent, self.errors = [], []

    def send(self, outputs, final):
        self.sent.append((outputs, final))

    def send_error(self, kind, message):
        self.errors.append((kind, message))

    def is_cancelled(self):
        return False


def _inputs(**kw):
    return lambda name: None if name not in kw else np.array([kw[name]], dtype=object if isinstance(kw[name][0], bytes) else None)


def test_parse_request_reads_trtllm_style_tensors():
    req = parse_request(_inputs(text_input=[b"hi"], max_tokens=[np.int32(5)], stream=[True],
                                stop_words=[b"a", b"bc"], random_seed=[np.uint64(9)],
                                temperature=[np.float32(0.5)]), 256)
    assert req.text == "hi" and req.ids is None and req.stream and req.params.stop == ["a", "bc"]
    assert req.params.seed == 9 and req.params.max_tokens == 5 and req.params.temperature == 0.5


@pytest.mark.parametrize("kw,field", [(dict(), "text_input"), (dict(text_input=[b"x"], top_p=[np.float32(2.0)]), "top_p"),
                                      (dict(text_input=[b"\xff"]), "UTF-8")])
def test_parse_request_errors_are_invalid_request(kw, field):
    with pytest.raises(RequestError) as err:
        parse_request(_inputs(**kw), 256)
    assert err.value.kind == "invalid_request" and field in str(err.value)


def test_streaming_sink_sends_pieces_then_data_then_empty_final():
    snd = RecordingSender()
    req = parse_request(_inputs(text_input=[b"hi"], stream=[True]), 256)
    sink = ResponseSink(snd, req)
    sink.piece("a", [], 2, 1)
    sink.finish("b", [], "length", 2, 2)
    assert [(o["text_output"][0][0] if o else None, f) for o, f in snd.sent] == [(b"a", False), (b"b", False), (None, True)]
    assert snd.sent[1][0]["finish_reason"][0][0] == b"length"


def test_streamed_responses_carry_the_running_token_counts():
    snd = RecordingSender()
    req = parse_request(_inputs(text_input=[b"hi"], stream=[True]), 256)
    sink = ResponseSink(snd, req)
    sink.piece("a", [], 2, 1)
    sink.piece("bc", [], 2, 3)
    sink.finish("d", [], "length", 2, 4)
    data = [o for o, _ in snd.sent if o is not None]
    assert [(o["num_input_tokens"].tolist(), o["num_output_tokens"].tolist()) for o in data] == [
        ([[2]], [[1]]), ([[2]], [[3]]), ([[2]], [[4]])]
    assert all(o["num_output_tokens"].dtype == np.int32 for o in data)
    assert ["finish_reason" in o for o in data] == [False, False, True]


def test_input_ids_outside_the_vocabulary_are_invalid_request():
    """Checked when the tensors are read, before the prompt is ever decoded: the tokenizer
    failed on a negative id or one of 2**32 or more (OverflowError: a 500). The model's
    vocabulary is the limit; it may be larger than the tokenizer's."""
    ids = lambda *t: lambda name: np.array([t], dtype=np.int64) if name == "input_ids" else None  # noqa: E731
    assert parse_request(ids(0, 1, 40), vocab_size=50).ids.tolist() == [0, 1, 40]
    for bad in ([0, -1], [50], [1, 2**40]):
        with pytest.raises(RequestError) as err:
            parse_request(ids(*bad), vocab_size=50)
        msg = str(err.value)
        assert msg.startswith("invalid_request: input_ids") and "vocabulary size is 50" in msg
        assert str(bad[-1]) in msg


def test_fake_model_streams_the_running_token_counts(monkeypatch):
    """The fixture model speaks the same interface: every streamed response has counts."""
    import importlib.util
    import json
    import sys
    import types
    from pathlib import Path

    class Tensor:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def as_numpy(self):
            return self.value

    inputs = {"text_input": np.array([[b"one two three"]], dtype=object), "max_tokens": np.array([[3]], dtype=np.int32),
              "stream": np.array([[True]])}
    pb = types.SimpleNamespace(
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1, Tensor=Tensor, TritonError=lambda msg: msg,
        InferenceResponse=lambda output_tensors=(), error=None: {t.name: t.value for t in output_tensors},
        get_input_tensor_by_name=lambda request, name: Tensor(name, inputs[name]) if name in inputs else None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    path = Path(__file__).resolve().parents[1] / "fixtures" / "fakellm" / "model.py"
    spec = importlib.util.spec_from_file_location("fakellm_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Sender:
        sent = []

        def send(self, response=None, flags=0):
            self.sent.append((response, flags))

        def is_cancelled(self):
            return False

    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": {"fake_delay_ms": {"string_value": "0"}}})})
    sender = Sender()
    model._generate(object(), sender)
    data = [r for r, _ in sender.sent if r is not None]
    assert [(int(r["num_input_tokens"][0][0]), int(r["num_output_tokens"][0][0])) for r in data] == [(3, 1), (3, 2), (3, 3)]
    assert ["finish_reason" in r for r in data] == [False, False, True] and sender.sent[-1] == (None, 1)


def test_non_streaming_sink_sends_one_final_response():
    snd = RecordingSender()
    req = parse_request(_inputs(text_input=[b"hi"], exclude_input_in_output=[False]), 256)
    sink = ResponseSink(snd, req)
    req.prompt_text = "hi"                                 # what preprocessing sets for an echo
    sink.piece("a", [], 2, 1)
    sink.finish("b", [], "stop", 2, 2)
    sink.fail("cancelled", "late")                         # after the end: nothing more
    assert len(snd.sent) == 1 and snd.sent[0][1] and snd.sent[0][0]["text_output"][0][0] == b"hiab"
    assert not snd.errors


# -- model loading --------------------------------------------------------------------------------------


def test_missing_or_corrupt_artifacts_fail_the_load_clearly(tmp_path):
    from llm_backend.decoder import ModelLoadError
    from llm_backend.model_config import EngineParams
    from llm_backend.service import load_engine

    with pytest.raises(ModelLoadError, match="missing model version directory"):
        load_engine(tmp_path / "1", EngineParams())
    (tmp_path / "1").mkdir()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_engine(tmp_path / "1", EngineParams())
    (tmp_path / "1" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_engine(tmp_path / "1", EngineParams())


def test_kv_budget_in_slots():
    from llm_backend.decoder import ModelLoadError
    from llm_backend.model_config import EngineParams
    from llm_backend.service import kv_slots

    row = 30 * 2 * 3 * 2048 * 64 * 4                       # 94 MB: one SmolLM2 slot of 2048 tokens
    assert kv_slots(EngineParams(max_num_seqs=16), row) == 16
    assert kv_slots(EngineParams(max_num_seqs=16, kv_cache_mb=300), row) == 3
    with pytest.raises(ModelLoadError, match="kv_cache_mb=50"):
        kv_slots(EngineParams(kv_cache_mb=50), row)


@pytest.mark.slow
def test_prompt_logits_do_not_depend_on_how_the_prompt_was_split(tmp_path):
    """A prefix-cache hit (or a chunk boundary) leaves a short tail to prefill. It ran in
    the int8-activation decode graph while a whole prompt ran in the fp32 prefill graph:
    logits differed by up to 0.8, so the same seeded request sampled other text once its
    prompt was cached, and greedy output could change."""
    from llm_backend.decoder import Decoder
    from stack.default_model import ensure_default_model

    version = ensure_default_model(tmp_path / "repo", precision="int4") / "1"
    dec = Decoder(version, num_slots=2, max_len=64, intra_op_threads=2)
    assert dec.prefill_session is not dec.session     # the int4 export has both graphs
    prompt = list(range(1000, 1037))
    whole = dec.prefill(0, prompt, 0)
    dec.prefill(1, prompt[:32], 0)                     # the cached blocks
    tail = dec.prefill(1, prompt[32:], 32)             # 5 tokens
    assert np.array_equal(whole, tail)


@pytest.mark.slow
@pytest.mark.skipif(not int8_gemm_is_exact(), reason="no VNNI on this CPU")
def test_w8a8_rows_are_bit_identical_alone_batched_or_split(tmp_path):
    """W8A8 quantizes each row's activations on its own and accumulates in integers, so a
    sequence's logits do not depend on its neighbours in the batch or on how its prompt
    was split: seeded and greedy requests give the same text under any load."""
    import onnx

    from llm_backend.decoder import Decoder, prepare_graph
    from stack.default_model import ensure_default_model

    version = ensure_default_model(tmp_path / "repo", precision="w8a8") / "1"
    decode_graph, prefill_graph = prepare_graph(version / "model.onnx", prefill_variant=True)
    assert prefill_graph is None                       # one graph serves both
    sliced = [n for n in onnx.load_from_string(decode_graph).graph.node if n.name == "llm_last/Slice"]
    assert len(sliced) == 1 and "norm" in sliced[0].input[0]   # LM head on the last position only
    dec = Decoder(version, num_slots=4, max_len=64, intra_op_threads=2)
    assert dec.prefill_session is dec.session
    prompts = [list(range(1000 + 7 * i, 1037 + 7 * i)) for i in range(4)]
    whole = dec.prefill(0, prompts[0], 0)
    dec.prefill(1, prompts[0][:32], 0)
    assert np.array_equal(whole, dec.prefill(1, prompts[0][32:], 32))
    for row in (2, 3):
        dec.prefill(row, prompts[row], 0)
    alone = dec.decode(np.array([42]), np.array([37]))[0]
    batched = dec.decode(np.array([42, 42, 7, 9]), np.array([37] * 4))
    assert np.array_equal(batched[0], alone) and np.array_equal(batched[1], alone)


@pytest.mark.slow
def test_logits_of_any_shape_through_a_kept_binding(tmp_path, monkeypatch):
    """Without the last-position slice (a graph whose head was not found) every prefill
    returns logits of its own length through the same kept io_binding."""
    import llm_backend.decoder as engine
    from stack.default_model import ensure_default_model

    version = ensure_default_model(tmp_path / "repo") / "1"
    sliced = engine.Decoder(version, num_slots=1, max_len=64, intra_op_threads=2)
    monkeypatch.setattr(engine, "_head_input", lambda graph: None)
    whole = engine.Decoder(version, num_slots=1, max_len=64, intra_op_threads=2)
    for n in (5, 9, 3):
        prompt = list(range(2000, 2000 + n))
        assert np.allclose(whole.prefill(0, prompt, 0), sliced.prefill(0, prompt, 0), atol=1e-4)
    assert len(whole._bindings) == 1


class RawSender:
    """Triton's response sender: what was sent, and whether the client cancelled."""

    def __init__(self, cancelled=False):
        self.cancelled, self.sent = cancelled, []

    def is_cancelled(self):
        return self.cancelled

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))


@pytest.fixture
def triton_sender(monkeypatch):
    """model.TritonSender over a stand-in for triton_python_backend_utils (FINAL is 1)."""
    import sys
    import types

    class TritonError:
        INVALID_ARG, UNAVAILABLE, CANCELLED, INTERNAL = range(4)

        def __init__(self, message, code):
            self.message, self.code = message, code

    pb = types.SimpleNamespace(TRITONSERVER_RESPONSE_COMPLETE_FINAL=1, TritonError=TritonError,
                               InferenceResponse=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "llm_backend.model", raising=False)
    from llm_backend.model import TritonSender
    return TritonSender


def test_error_to_a_cancelled_request_is_the_bare_final_flag(triton_sender):
    """Triton never releases an error response sent to a cancelled request, and the model
    then cannot unload (tritonserver killed after its exit timeout). The adapter cancels
    a request's other choices when one gets over_capacity, often while theirs is sent."""
    gone = RawSender(cancelled=True)
    triton_sender(gone).send_error("over_capacity", "64 requests are waiting")
    assert gone.sent == [(None, 1)]
    live = RawSender(cancelled=False)
    triton_sender(live).send_error("over_capacity", "64 requests are waiting")
    (response, flags), = live.sent
    assert flags == 1 and response["error"].message.startswith("over_capacity: ")


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
    s = _sched(metrics=m, max_queue_size=10)
    sinks = [ListSink() for _ in range(6)]
    for i, sink in enumerate(sinks):
        s.submit([1, 2, 3 + i], SamplingParams(max_tokens=20), sink)
    s.step()
    assert m.last[1] > 0 and m.last[0] > 0
    s.abort_all("internal", "engine step failed")
    assert s.idle and all(k.error for k in sinks)
    assert m.last == (0, 0, 0.0)


# -- tokenizing off the engine loop ----------------------------------------------------------------------


def wait_until(condition, timeout=20.0, what="condition"):
    """Poll a state (threads of the engine are at work); never a bare sleep."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class GatedTokenizer(ByteTokenizer):
    """Encoding a prompt that starts with "##" blocks until `gate` is set (like a
    tokenizer at work with the GIL released); `entered` says it has begun. (FakeDecoder's
    vocabulary is 64: prompts are digits and punctuation.)"""

    def __init__(self):
        import threading

        self.gate, self.entered = threading.Event(), threading.Event()

    def encode_batch_fast(self, texts, add_special_tokens=False):
        if texts[0].startswith("##"):
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().encode_batch_fast(texts, add_special_tokens)


def _request(text, **kw):
    from llm_backend.protocol import parse_request

    inputs = {"text_input": [text.encode()], **{k: [v] for k, v in kw.items()}}
    return parse_request(_inputs(**inputs), 256)


def _engine(tokenizer, chars_per_token=None, **kw):
    from llm_backend.runtime import EngineThread

    opts = dict(max_model_len=64, max_queue_size=4, prefill_chunk=8, prefix_cache=PrefixCache(0))
    opts.update(kw)
    sched = Scheduler(FakeDecoder(), tokenizer, **opts)
    return EngineThread(sched, idle_wait=0.01, chars_per_token=chars_per_token)


def test_the_engine_keeps_stepping_while_a_prompt_is_tokenized():
    """A prompt is tokenized by a worker, never on the engine thread (nor Triton's): a
    request that arrives later is prefilled and decoded to its end while the first
    one's tokenizer is still at work."""
    tok = GatedTokenizer()
    engine = _engine(tok)
    decodes = lambda: sum(1 for c in engine.sched.dec.calls if c[0] == "decode")  # noqa: E731
    try:
        running, slow = ListSink(), ListSink()
        engine.submit(_request("## 345", max_tokens=np.int32(3)), slow)    # returns at once
        assert tok.entered.wait(10)
        engine.submit(_request("12", max_tokens=np.int32(40), ignore_eos=True), running)
        wait_until(lambda: running.end is not None, what="the later request to finish")
        assert running.end == ("length", 2, 40) and len(running.counts) == 39
        assert decodes() == 39                                # every step ran while tokenizing
        assert not tok.gate.is_set() and slow.end is None and slow.error is None
        assert engine.pre.busy == 1 and engine.sched._pending == 1   # reserved, not yet queued
        tok.gate.set()
        wait_until(lambda: slow.end is not None, what="the slow prompt's request to finish")
        assert slow.end == ("length", len("## 345"), 3)
    finally:
        tok.gate.set()
        engine.close(drain_timeout=5)
    assert engine.pre.busy == 0 and engine.sched._pending == 0


def test_a_prompt_over_the_character_bound_is_refused_before_tokenizing():
    """At most 3 characters a token and 64 tokens of context: 193 characters cannot fit."""
    from llm_backend.error_kinds import RequestError as Refused

    class Counting(ByteTokenizer):
        calls = 0

        def encode_batch_fast(self, texts, add_special_tokens=False):
            Counting.calls += 1
            return super().encode_batch_fast(texts, add_special_tokens)

    engine = _engine(Counting(), chars_per_token=3)
    try:
        with pytest.raises(Refused) as err:
            engine.submit(_request("x" * 193), ListSink())
        msg = str(err.value)
        assert msg.startswith("context_length_exceeded: ") and err.value.kind == "context_length_exceeded"
        assert "193 characters" in msg and "192" in msg and "64 tokens" in msg
        assert Counting.calls == 0 and engine.sched._pending == 0

        sink = ListSink()                                 # under the bound: tokenized, then the exact check
        engine.submit(_request("x" * 192), sink)
        wait_until(lambda: sink.error is not None, what="the exact check")
        assert sink.error[0] == "context_length_exceeded" and "192 tokens" in sink.error[1]
        assert Counting.calls == 1

        from llm_backend.protocol import parse_request

        def ids(n):
            return parse_request(lambda name: np.arange(1, n + 1)[None] if name == "input_ids" else None, 256)

        with pytest.raises(Refused, match="the prompt has 64 tokens"):   # ids: counted, never decoded
            engine.submit(ids(64), ListSink())
        ok = ListSink()
        engine.submit(ids(10), ok)
        wait_until(lambda: ok.end is not None, what="the ids request")
        assert ok.end[1] == 10
    finally:
        engine.close(drain_timeout=5)
    assert engine.sched._pending == 0


def test_a_request_cancelled_while_tokenized_ends_with_the_bare_final_flag(triton_sender):
    """It never reaches the scheduler; its slot reservation is given back."""
    from llm_backend.protocol import ResponseSink

    tok = GatedTokenizer()
    engine = _engine(tok)
    try:
        raw = RawSender()
        req = _request("## 6 7 8", max_tokens=np.int32(5))
        engine.submit(req, ResponseSink(triton_sender(raw), req))
        assert tok.entered.wait(10)
        raw.cancelled = True                              # the client leaves mid-tokenization
        tok.gate.set()
        wait_until(lambda: raw.sent, what="the final flag")
        wait_until(lambda: engine.pre.busy == 0, what="the worker to finish")
        assert raw.sent == [(None, 1)]
        assert engine.sched._pending == 0 and engine.sched.idle
        assert not [c for c in engine.sched.dec.calls if c[0] == "prefill"]
        assert req.text is None                           # the prompt is not kept
    finally:
        tok.gate.set()
        engine.close(drain_timeout=5)


def test_unload_while_a_prompt_is_tokenized_ends_every_request():
    tok = GatedTokenizer()
    engine = _engine(tok)
    slow, queued = ListSink(), ListSink()
    engine.submit(_request("## 9", max_tokens=np.int32(2)), slow)
    engine.submit(_request("## 10", max_tokens=np.int32(2)), queued)     # the second worker's
    assert tok.entered.wait(10)
    import threading
    closer = threading.Thread(target=engine.close, kwargs={"drain_timeout": 0.2})
    closer.start()
    wait_until(lambda: engine.closed, what="closing")
    with pytest.raises(RequestError, match="unloading"):
        engine.submit(_request("11"), ListSink())
    tok.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    for sink in (slow, queued):
        assert sink.end is not None or sink.error is not None
    assert engine.sched._pending == 0


def _bpe_tokenizer(normalizer=None, pre_tokenizer="bytelevel", vocab_size=400, **model_kw):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(**model_kw))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if pre_tokenizer == "bytelevel"
                         else pre_tokenizer)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog " * 3, "=" * 40, " " * 30 + "indented",
              "ὦ ᾂ ἄλφα βῆτα", "日本語のテキスト", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def _prompts():
    import unicodedata

    greek = unicodedata.normalize("NFD", "ᾂᾂᾂ ὦ ἄλφα ") * 50     # NFC composes 4 code points into 1
    return ["the quick brown fox " * 40, "=" * 500, " " * 300, "<|im_start|>" * 20, "日本語" * 100, greek,
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" * 30 + "\n" * 50]


def test_characters_per_token_bound_the_prompt_for_byte_level_and_composing_tokenizers():
    from tokenizers import normalizers

    from llm_backend.preprocess import MAX_COMPOSED, encode, max_chars_per_token

    for normalizer, factor in ((None, 1), (normalizers.NFC(), MAX_COMPOSED),
                               (normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]), MAX_COMPOSED)):
        tok = _bpe_tokenizer(normalizer)
        c = max_chars_per_token(tok)
        longest = max(len(t) for t in tok.get_vocab(with_added_tokens=True))
        assert c == factor * longest
        for text in _prompts():
            n = len(encode(tok, text))
            assert len(text) <= c * n, (normalizer, text[:20])


def test_tokenizers_that_can_drop_text_have_no_character_bound():
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    from llm_backend.preprocess import max_chars_per_token

    assert max_chars_per_token(_bpe_tokenizer(normalizers.Strip())) is None
    assert max_chars_per_token(_bpe_tokenizer(normalizers.Replace("  ", ""))) is None
    assert max_chars_per_token(_bpe_tokenizer(normalizers.Replace(" ", "▁"))) is not None
    assert max_chars_per_token(_bpe_tokenizer(pre_tokenizer=pre_tokenizers.Whitespace())) is None
    assert max_chars_per_token(_bpe_tokenizer(unk_token="<unk>", fuse_unk=True)) is None
    assert max_chars_per_token(Tokenizer(models.WordPiece({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))) is None
    stripping = _bpe_tokenizer()
    stripping.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert max_chars_per_token(stripping) is None
    assert max_chars_per_token(ByteTokenizer()) is None          # not a tokenizers.Tokenizer


def test_max_composed_is_the_longest_canonical_composition():
    import sys
    import unicodedata

    from llm_backend.preprocess import MAX_COMPOSED

    longest = 0
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        d = unicodedata.normalize("NFD", c)
        if len(d) > longest and unicodedata.normalize("NFC", d) == c:
            longest = len(d)
    assert longest == MAX_COMPOSED


def test_the_default_model_tokenizer_bound():
    """SmolLM2: byte-level BPE, no normalizer; its longest token is 81 characters."""
    from pathlib import Path

    from llm_backend.preprocess import encode, max_chars_per_token

    path = Path(__file__).resolve().parents[2] / ".cache" / "models" / "smollm2-135m-instruct" / "tokenizer.json"
    if not path.exists():
        pytest.skip("the default checkpoint is not fetched")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    c = max_chars_per_token(tok)
    assert c == 81
    for text in _prompts() + [" " * 5000, "#" * 5000]:
        assert len(text) <= c * len(encode(tok, text))
