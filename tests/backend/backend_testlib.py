"""Fakes shared by the backend's unit tests: a byte tokenizer, a decoder whose KV is
its token history, sinks and senders that record what they get, the engine built over
them exactly as service.py builds it."""

from __future__ import annotations

import threading
import time

import numpy as np

from llm_backend.prefix_cache import PrefixCache
from llm_backend.protocol import parse_request
from llm_backend.responder import Responder
from llm_backend.service import CANCEL_POLL_INTERVAL_S, build_core, start_engine


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


class FakeSpec:
    vocab_size = 64
    eos_token_ids = [0]


class FakeDecoder:
    """Rows hold the token history; the next token is a function of the whole row, so
    any KV mix-up (wrong row after a move, stale positions) changes the output."""

    def __init__(self, num_slots=4, max_len=64, batched_prefill=False):
        self.spec = FakeSpec()
        self.num_slots, self.max_len = num_slots, max_len
        self.batched_prefill = batched_prefill
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

    def prefill_batch(self, first, prompts):
        assert self.batched_prefill
        self.calls.append(("prefill_batch", [len(p) for p in prompts]))
        out = []
        for i, p in enumerate(prompts):
            self.kv[first + i][:len(p)] = list(p)
            out.append(self._logits(self.kv[first + i][:len(p)]))
        return np.stack(out)

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


class RecordingSender:
    def __init__(self):
        self.sent, self.errors = [], []

    def send(self, outputs, final):
        self.sent.append((outputs, final))

    def send_error(self, kind, message):
        self.errors.append((kind, message))

    def is_cancelled(self):
        return False


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


class RawSender:
    """Triton's response sender: what was sent, and whether the client cancelled."""

    def __init__(self, cancelled=False):
        self.cancelled, self.sent = cancelled, []

    def is_cancelled(self):
        return self.cancelled

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))


def wait_until(condition, timeout=20.0, what="condition"):
    """Poll a state (threads of the engine are at work); never a bare sleep."""
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
        self.gate, self.entered = threading.Event(), threading.Event()

    def encode_batch_fast(self, texts, add_special_tokens=False):
        if texts[0].startswith("##"):
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().encode_batch_fast(texts, add_special_tokens)


def inputs(**kw):
    """A request's tensors as parse_request reads them."""
    return lambda name: None if name not in kw else np.array([kw[name]], dtype=object if isinstance(kw[name][0], bytes) else None)


def parsed(text, **kw):
    """A parsed text request (protocol.ParsedRequest), as Triton's execute() hands it on."""
    tensors = {"text_input": [text.encode()], **{k: [v] for k, v in kw.items()}}
    return parse_request(inputs(**tensors), 256)


def core(dec=None, tokenizer=None, *, outbox=None, **kw):
    """The engine's step machine over a FakeDecoder, its outbox without a thread: `step`
    runs one step and delivers what it sent, as the responder thread would."""
    opts = dict(max_model_len=64, max_queue_size=2, prefill_chunk=8, prefix_cache=PrefixCache(2**20, block=4))
    opts.update(kw)
    return build_core(dec or FakeDecoder(), tokenizer or ByteTokenizer(), outbox or Responder(start=False), **opts)


def step(c):
    c.step()
    c.outbox.run_pending()


def run(c, steps=500):
    """Step until idle (the responder's cancellation polls included)."""
    for _ in range(steps):
        if c.idle:
            return
        step(c)
    raise AssertionError("the engine did not finish")


def engine(tokenizer=None, dec=None, chars_per_token=None, **kw):
    """The production engine over a FakeDecoder: engine thread, responder thread,
    tokenizer workers."""
    opts = dict(max_model_len=64, max_queue_size=4, prefill_chunk=8, prefix_cache=PrefixCache(0))
    opts.update(kw)
    # the production outbox: cancellation polled at most every CANCEL_POLL_INTERVAL_S
    c = build_core(dec or FakeDecoder(), tokenizer or ByteTokenizer(), Responder(poll_interval=CANCEL_POLL_INTERVAL_S),
                   **opts)
    return start_engine(c, tokenizer or ByteTokenizer(), chars_per_token=chars_per_token, tokenize_workers=2,
                        idle_wait=0.01)
