"""Continuous batching over the decoder's KV slots.

One engine thread runs `step()` in a loop. Each step:

1. drops cancelled requests (waiting or running), freeing their slots;
2. prefills newcomers, at most `prefill_chunk` prompt tokens per step, one sequence at
   a time in arrival order, after copying any cached prefix into its slot; a long
   prompt is split over several steps so running streams keep decoding;
3. decodes every running sequence together in one call;
4. samples, detokenizes, applies stop strings, hands text to each request's sink, and
   lets finished sequences leave.

Rows: decoding sequences occupy rows [0, d) of the KV buffer, the sequence being
prefilled row d. A departure moves the last decoding row into the hole (one copy per
departure, not per step). Importable and testable without Triton.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .detokenizer import IncrementalDetokenizer, StopStringBuffer
from .error_kinds import CANCELLED, CONTEXT, INTERNAL, INVALID, OVER_CAPACITY, RequestError
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .runtime import Responder

log = logging.getLogger(__name__)

def check_token_ids(ids, vocab_size: int) -> None:
    """Raises invalid_request for an id outside the model's vocabulary (a list or an array)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise RequestError(INVALID, f"input_ids[{i}] is {int(arr[i])}: token ids must be in [0, {vocab_size}), "
                                    f"the vocabulary size is {vocab_size}")


class Sink(Protocol):
    """Where a request's output goes (model.py: a Triton response sender)."""

    def is_cancelled(self) -> bool: ...

    def piece(self, text: str, logprobs: list[float], num_input_tokens: int,
              num_output_tokens: int) -> None: ...   # output tokens so far, this piece's included

    def finish(self, text: str, logprobs: list[float], finish_reason: str,
               num_input_tokens: int, num_output_tokens: int) -> None: ...

    def fail(self, kind: str, message: str) -> None: ...


class Metrics(Protocol):
    """Generated tokens are those of num_output_tokens: an EOS that ends a sequence is
    not one (nor is the wait for it an inter-token latency)."""

    def state(self, waiting: int, running: int, kv_usage: float) -> None: ...

    def first_token(self, seconds: float, prompt_tokens: int, generated: int) -> None: ...

    def tokens(self, n: int, inter_token_seconds: list[float]) -> None: ...


class NullMetrics:
    def state(self, waiting, running, kv_usage):
        pass

    def first_token(self, seconds, prompt_tokens, generated):
        pass

    def tokens(self, n, inter_token_seconds):
        pass


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    max_tokens: int
    sampler: Sampler
    detok: IncrementalDetokenizer
    stops: StopStringBuffer
    arrival: float = field(default_factory=time.monotonic)
    computed: int = 0                    # KV positions filled
    output: list[int] = field(default_factory=list)
    next_token: int = -1                 # sampled, not yet in the KV cache
    last_time: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    tail: str = ""                       # text released by the finishing token
    cancelled: bool = False              # set by the Responder's poll


class Scheduler:
    """Owns the decoder; `submit` may be called from any thread, `step` from one."""

    def __init__(self, decoder, tokenizer, *, max_model_len: int, max_queue_size: int,
                 prefill_chunk: int, prefix_cache: PrefixCache | None = None,
                 metrics: Metrics | None = None, eos_token_ids: list[int] | None = None):
        self.dec = decoder
        self.tok = tokenizer
        self.max_model_len = max_model_len
        self.max_queue_size = max_queue_size
        self.prefill_chunk = max(1, prefill_chunk)
        self.cache = prefix_cache or PrefixCache(0)
        self.metrics = metrics or NullMetrics()
        self.eos = set(eos_token_ids if eos_token_ids is not None else decoder.spec.eos_token_ids)
        self.vocab = decoder.spec.vocab_size
        self.inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []          # decoding, row i = rows[i]
        self.prefilling: Sequence | None = None  # at row len(self.rows)
        self._lock = threading.Lock()
        self._pending = 0                        # submitted, not yet in a slot
        self._last_state = None
        # Sending and cancellation checks: inline by default (tests); EngineThread hands
        # them to a Responder thread so the IPC to Triton overlaps the next model call.
        self.emit = self._safe
        self.responder: Responder | None = None  # runtime.Responder
        # where the engine's time goes (logged when it turns idle): seconds, counts
        self.stats = {"steps": 0, "step_s": 0.0, "prefill_s": 0.0, "prefill_tokens": 0,
                      "decode_s": 0.0, "decode_tokens": 0}

    # -- admission (any thread) -------------------------------------------------------------
    def reserve(self) -> None:
        """Hold a place for a request that is still being tokenized, so the queue bound
        covers it too: raises over_capacity when `max_queue_size` requests already wait
        beyond the free slots. Each reserve is followed by exactly one
        `submit(..., reserved=True)` (which keeps or gives back the place) or `release()`."""
        with self._lock:
            if self._pending >= self.max_queue_size + self.free_rows():
                raise RequestError(OVER_CAPACITY, f"{self._pending} requests are waiting "
                                                  f"(max_queue_size {self.max_queue_size}); retry later")
            self._pending += 1

    def release(self) -> None:
        with self._lock:
            self._pending -= 1

    def check_length(self, n: int, max_tokens: int | None) -> int:
        """The completion's token budget for an `n`-token prompt; raises
        context_length_exceeded with both numbers when it does not fit."""
        limit = self.max_model_len
        if max_tokens is None:
            if n >= limit:
                raise RequestError(CONTEXT, f"this model's maximum context length is {limit} tokens, "
                                            f"but the prompt has {n} tokens")
            return limit - n
        if n + max_tokens > limit:
            raise RequestError(CONTEXT, f"this model's maximum context length is {limit} tokens, "
                                        f"but {n + max_tokens} were requested ({n} in the prompt, "
                                        f"{max_tokens} for the completion)")
        return max_tokens

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink, *, reserved: bool = False) -> None:
        """Validate and queue; raises RequestError for the caller to report. `reserved`:
        the caller took the place with `reserve()` (and gives it back if this raises)."""
        n = len(prompt)
        if n == 0:
            raise RequestError(INVALID, "the prompt is empty (text_input or input_ids)")
        max_tokens = self.check_length(n, params.max_tokens)   # first: cheap for any length
        check_token_ids(prompt, self.vocab)
        seq = Sequence(prompt=list(prompt), params=params, sink=sink, max_tokens=max_tokens,
                       sampler=Sampler(params, self.vocab),
                       detok=IncrementalDetokenizer(self.tok, prompt),
                       stops=StopStringBuffer(params.stop))
        if not reserved:
            self.reserve()
        self.inbox.put(seq)

    def free_rows(self) -> int:
        return self.dec.num_slots - len(self.rows) - (self.prefilling is not None)

    # -- the engine loop (one thread) ----------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.rows and self.prefilling is None and not self.waiting and self.inbox.empty()

    def wait_for_work(self, timeout: float) -> None:
        if self.idle:
            try:
                self.waiting.append(self.inbox.get(timeout=timeout))
            except queue.Empty:
                pass

    def step(self) -> None:
        t0 = time.perf_counter()
        self._step()
        self.stats["steps"] += 1
        self.stats["step_s"] += time.perf_counter() - t0
        if self.idle and self.stats["steps"]:
            st = self.stats
            log.info("engine busy period: %d steps %.2fs (prefill %d tokens %.2fs, decode %d tokens %.2fs, "
                     "other %.2fs)", st["steps"], st["step_s"], st["prefill_tokens"], st["prefill_s"],
                     st["decode_tokens"], st["decode_s"], st["step_s"] - st["prefill_s"] - st["decode_s"])
            for k in st:
                st[k] = 0 if isinstance(st[k], int) else 0.0

    def _step(self) -> None:
        self.step_inbox_drain()
        self._drop_cancelled()
        self._prefill()
        self._decode()
        self._report_state()
        if self.responder is not None:
            self.responder.request_poll(self._in_flight())

    def _in_flight(self) -> list:
        """Every admitted sequence: waiting, being prefilled, decoding."""
        return list(self.waiting) + self.rows + ([self.prefilling] if self.prefilling else [])

    def abort_all(self, kind: str, message: str) -> None:
        """Fail everything in flight (unload)."""
        self.step_inbox_drain()
        for seq in self._in_flight():
            self.emit(seq.sink.fail, kind, message)
        with self._lock:
            self._pending -= len(self.waiting)
        self.waiting.clear()
        self.rows.clear()
        self.prefilling = None
        self._report_state()   # the engine goes idle: no step would set the gauges to 0

    def step_inbox_drain(self) -> None:
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    # -- pieces of a step ------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        keep = deque()
        for seq in self.waiting:
            if self._cancelled(seq):
                with self._lock:
                    self._pending -= 1
            else:
                keep.append(seq)
        self.waiting = keep
        if self.prefilling is not None and self._cancelled(self.prefilling):
            self.prefilling = None
        gone = [i for i, seq in enumerate(self.rows) if self._cancelled(seq)]
        self._remove_rows(gone)

    def _cancelled(self, seq: Sequence) -> bool:
        if self.responder is None:
            seq.cancelled = seq.cancelled or _ask_cancelled(seq)
        if seq.cancelled:
            self.emit(seq.sink.fail, CANCELLED, "the request was cancelled by the client")
        return seq.cancelled

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        while budget > 0:
            if self.prefilling is None:
                if not self.waiting or self.free_rows() < 1:
                    return
                seq = self.waiting.popleft()
                with self._lock:
                    self._pending -= 1
                self.prefilling = seq
                row = len(self.rows)
                for i, kv in enumerate(self.cache.lookup(seq.prompt)):
                    self.dec.write_rows(row, i * self.cache.block, kv)
                    seq.computed += kv.shape[3]
            seq, row = self.prefilling, len(self.rows)
            chunk = seq.prompt[seq.computed:seq.computed + budget]
            try:
                t0 = time.perf_counter()
                logits = self.dec.prefill(row, chunk, seq.computed)
                self.stats["prefill_s"] += time.perf_counter() - t0
                self.stats["prefill_tokens"] += len(chunk)
            except Exception as err:
                log.exception("prefill failed")
                self.prefilling = None
                self.emit(seq.sink.fail, INTERNAL, f"prefill failed: {err}")
                continue
            seq.computed += len(chunk)
            budget -= len(chunk)
            if seq.computed < len(seq.prompt):
                continue
            self.prefilling = None
            self._cache_prompt(seq, row)
            now = time.monotonic()
            seq.last_time = now
            done = self._accept(seq, logits)
            self.emit(self.metrics.first_token, now - seq.arrival, len(seq.prompt), len(seq.output))
            if done:
                self._finish_after_step(seq)
            else:
                self.rows.append(seq)

    def _cache_prompt(self, seq: Sequence, row: int) -> None:
        b = self.cache.block
        self.cache.store(seq.prompt, lambda i: self.dec.read_rows(row, i * b, (i + 1) * b))

    def _decode(self) -> None:
        if not self.rows:
            return
        tokens = np.array([s.next_token for s in self.rows], dtype=np.int64)
        lengths = np.array([s.computed for s in self.rows], dtype=np.int64)
        try:
            t0 = time.perf_counter()
            logits = self.dec.decode(tokens, lengths)
            self.stats["decode_s"] += time.perf_counter() - t0
            self.stats["decode_tokens"] += len(tokens)
        except Exception as err:
            log.exception("decode failed")
            for seq in self.rows:
                self.emit(seq.sink.fail, INTERNAL, f"decode failed: {err}")
            self.rows.clear()
            if self.prefilling is not None:   # its partial KV is at row 0 now in spirit: restart it
                self.prefilling.computed = 0
            return
        now = time.monotonic()
        done, gaps = [], []
        for i, seq in enumerate(self.rows):
            seq.computed += 1
            gap, seq.last_time = now - seq.last_time, now
            generated = len(seq.output)
            if self._accept(seq, logits[i]):
                done.append(i)
            if len(seq.output) > generated:
                gaps.append(gap)
        if gaps:
            self.emit(self.metrics.tokens, len(gaps), gaps)
        for i in done:
            self._finish_after_step(self.rows[i])
        self._remove_rows(done)

    def _accept(self, seq: Sequence, logits: np.ndarray) -> bool:
        """Sample one token for `seq` and send its text; True when the sequence is done."""
        token, lp = seq.sampler(logits)
        seq.next_token = token
        if token in self.eos and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
            return True
        seq.output.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
        text = seq.stops.push(seq.detok.push(token))
        if seq.stops.stopped:
            seq.finish_reason, seq.tail = "stop", text
            return True
        if len(seq.output) >= seq.max_tokens or len(seq.prompt) + len(seq.output) >= self.max_model_len:
            seq.finish_reason = "length"
            seq.tail = text
            return True
        if text:
            lps, seq.logprobs = seq.logprobs, []
            self.emit(seq.sink.piece, text, lps, len(seq.prompt), len(seq.output))
        return False

    def _finish_after_step(self, seq: Sequence) -> None:
        tail = seq.tail
        if not seq.stops.stopped:
            tail += seq.stops.push(seq.detok.flush())
            tail += seq.stops.flush()
        self.emit(seq.sink.finish, tail, seq.logprobs, seq.finish_reason,
                   len(seq.prompt), len(seq.output))

    def _remove_rows(self, indices: list[int]) -> None:
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                moved = self.rows[last]
                self.dec.move_row(last, i, moved.computed)
                self.rows[i] = moved
            self.rows.pop()
            if self.prefilling is not None:   # keep it right after the decoding rows
                self.dec.move_row(last + 1, last, self.prefilling.computed)

    def _report_state(self) -> None:
        running = len(self.rows) + (self.prefilling is not None)
        used = sum(s.computed for s in self.rows) + (self.prefilling.computed if self.prefilling else 0)
        state = (len(self.waiting) + self.inbox.qsize(), running,
                 round(used / (self.dec.num_slots * self.dec.max_len), 4))
        if state != self._last_state:
            self._last_state = state
            self.emit(self.metrics.state, *state)

    @staticmethod
    def _safe(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("sending a response failed")


def _ask_cancelled(seq: Sequence) -> bool:
    try:
        return bool(seq.sink.is_cancelled())
    except Exception:  # a sender that cannot answer is as good as gone
        return True
