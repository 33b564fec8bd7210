"""Unit tests of the backend's plain modules (no Triton, no ONNX model): sampling, the
detokenizer and stop strings, the prompt cache, request parsing and responses, loading,
the tokenizer's character bound. The engine's own tests are in test_engine_units.py."""

from __future__ import annotations

import numpy as np
import pytest
from backend_testlib import (  # type: ignore[import-not-found]
    ByteTokenizer,
    RawSender,
    RecordingSender,
    inputs,
)

from llm_backend.decoder import int8_gemm_is_exact
from llm_backend.detokenizer import IncrementalDetokenizer, StopStringBuffer
from llm_backend.error_kinds import RequestError
from llm_backend.prefix_cache import PrefixCache
from llm_backend.protocol import ResponseSink, parse_request
from llm_backend.sampling import Sampler, SamplingParams

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


# -- request parsing and responses --------------------------------------------------------------------


def test_parse_request_reads_trtllm_style_tensors():
    req = parse_request(inputs(text_input=[b"hi"], max_tokens=[np.int32(5)], stream=[True],
                                stop_words=[b"a", b"bc"], random_seed=[np.uint64(9)],
                                temperature=[np.float32(0.5)]), 256)
    assert req.text == "hi" and req.ids is None and req.stream and req.params.stop == ["a", "bc"]
    assert req.params.seed == 9 and req.params.max_tokens == 5 and req.params.temperature == 0.5


@pytest.mark.parametrize("kw,field", [(dict(), "text_input"), (dict(text_input=[b"x"], top_p=[np.float32(2.0)]), "top_p"),
                                      (dict(text_input=[b"\xff"]), "UTF-8")])
def test_parse_request_errors_are_invalid_request(kw, field):
    with pytest.raises(RequestError) as err:
        parse_request(inputs(**kw), 256)
    assert err.value.kind == "invalid_request" and field in str(err.value)


def test_streaming_sink_sends_pieces_then_data_then_empty_final():
    snd = RecordingSender()
    req = parse_request(inputs(text_input=[b"hi"], stream=[True]), 256)
    sink = ResponseSink(snd, req)
    sink.piece("a", [], 2, 1)
    sink.finish("b", [], "length", 2, 2)
    assert [(o["text_output"][0][0] if o else None, f) for o, f in snd.sent] == [(b"a", False), (b"b", False), (None, True)]
    assert snd.sent[1][0]["finish_reason"][0][0] == b"length"


def test_streamed_responses_carry_the_running_token_counts():
    snd = RecordingSender()
    req = parse_request(inputs(text_input=[b"hi"], stream=[True]), 256)
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
    req = parse_request(inputs(text_input=[b"hi"], exclude_input_in_output=[False]), 256)
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
    with pytest.raises(ModelLoadError, match=r"stream_interval \(0\) must be at least 1"):
        load_engine(tmp_path / "1", EngineParams(stream_interval=0))
    with pytest.raises(ModelLoadError, match=r"max_prefill_batch \(0\) must be at least 1"):
        load_engine(tmp_path / "1", EngineParams(max_prefill_batch=0))


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
    assert not dec.batched_prefill                     # its fp32 prefill sums depend on the batch
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
    picked = [n for n in onnx.load_from_string(decode_graph).graph.node if n.name == "llm_last/GatherND"]
    assert len(picked) == 1 and "norm" in picked[0].input[0]   # LM head on one position per row only
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
    # new prompts of different lengths prefilled together, right-padded: each row's logits
    # and KV are its prompt's alone
    prompts = [prompts[0], prompts[1][:20], prompts[2][:29]]
    lone = [dec.prefill(0, p, 0) for p in prompts[:1]] + [dec.prefill(i, p, 0) for i, p in enumerate(prompts) if i]
    kv = [dec.read_rows(i, 0, len(p)).copy() for i, p in enumerate(prompts)]
    assert dec.batched_prefill
    together = dec.prefill_batch(1, prompts)                       # rows 1-3
    for i, p in enumerate(prompts):
        assert np.array_equal(together[i], lone[i]) and np.array_equal(dec.read_rows(1 + i, 0, len(p)), kv[i])


@pytest.mark.slow
def test_logits_of_any_shape_through_a_kept_binding(tmp_path, monkeypatch):
    """Without the last-position slice (a graph whose head was not found) every prefill
    returns logits of its own length through the same kept io_binding."""
    import llm_backend.decoder as decoder
    from stack.default_model import ensure_default_model

    version = ensure_default_model(tmp_path / "repo") / "1"
    sliced = decoder.Decoder(version, num_slots=1, max_len=64, intra_op_threads=2)
    monkeypatch.setattr(decoder, "_head_input", lambda graph: None)
    whole = decoder.Decoder(version, num_slots=1, max_len=64, intra_op_threads=2)
    assert whole._logits_out is None and sliced._logits_out is not None
    for n in (5, 9, 3):
        prompt = list(range(2000, 2000 + n))
        assert np.allclose(whole.prefill(0, prompt, 0), sliced.prefill(0, prompt, 0), atol=1e-4)
    assert len(whole._bindings) == 1 and sliced.batched_prefill and not whole.batched_prefill


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


# -- the tokenizer's character bound ----------------------------------------------------------------------


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


# -- the stub's environment ---------------------------------------------------------------------


def test_a_numpy_the_stub_package_excludes_refuses_the_load_with_the_reason():
    from llm_backend.stub_env import numpy_problem

    requires = ["numpy<2.0.0,>=1.21", "protobuf>=3.7", 'pytest~=8.1.1; extra == "test"']
    problem = numpy_problem("2.5.2", requires, "0.7.0")
    assert problem and "numpy 2.5.2" in problem and "nvidia-pytriton 0.7.0" in problem
    assert "numpy<2.0.0,>=1.21" in problem                 # what to install instead
    assert numpy_problem("1.26.4", requires, "0.7.0") is None
    assert numpy_problem("2.5.2", ['numpy<2; extra == "test"']) is None   # an extra's pin is not the stub's


def test_this_environment_meets_the_stub_packages_numpy_requirement():
    from importlib import metadata

    from llm_backend.stub_env import check_stub_environment

    assert metadata.requires("nvidia-pytriton")              # the real metadata is read, not skipped
    assert check_stub_environment() is None
