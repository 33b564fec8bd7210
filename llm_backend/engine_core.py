"""The engine loop: what one step does, and the thread that runs the steps.

Around it (the vllm_backend structure): Triton's execute() only parses and hands a
request to `EngineThread.submit`; tokenizer workers turn its prompt into ids and add it
(preprocess.py); the engine thread runs `EngineCore.step` in a loop; the responder
thread (the outbox, passed in at construction) does every IPC to Triton.

One step: the scheduler says what runs (scheduler.py), the decoder runs it
(decoder.py), each row's sampler picks a token, the scheduler records it, the output
processor turns it into text for the client (output_processor.py). Importable and
testable without Triton.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .error_kinds import CANCELLED, INTERNAL, OVER_CAPACITY, RequestError
from .output_processor import OutputProcessor
from .request import Request, Sink
from .sampling import SamplingParams
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class BusyPeriod:
    """Where the engine's time goes between two idle moments (logged when it idles)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = self.prefill_tokens = self.decode_tokens = 0
        self.step_s = self.prefill_s = self.decode_s = 0.0

    def log(self) -> None:
        log.info("engine busy period: %d steps %.2fs (prefill %d tokens %.2fs, decode %d tokens %.2fs, "
                 "other %.2fs)", self.steps, self.step_s, self.prefill_tokens, self.prefill_s,
                 self.decode_tokens, self.decode_s, self.step_s - self.prefill_s - self.decode_s)
        self.reset()


class EngineCore:
    """Owns the decoder; `add_request` may be called from any thread, the rest from one."""

    def __init__(self, decoder, scheduler: Scheduler, outputs: OutputProcessor, outbox):
        self.dec = decoder
        self.scheduler = scheduler
        self.outputs = outputs
        self.outbox = outbox
        self.max_model_len = scheduler.max_model_len
        self.vocab = decoder.spec.vocab_size
        self.times = BusyPeriod()

    def add_request(self, prompt: list[int], params: SamplingParams, sink: Sink, *, reserved: bool = False) -> None:
        """Validate and queue; raises RequestError for the caller to report. `reserved`:
        the caller took the place with `scheduler.reserve()` (and gives it back if this raises)."""
        req = Request.new(prompt, params, sink, max_model_len=self.max_model_len, vocab_size=self.vocab)
        self.outputs.add_request(req)
        self.scheduler.add_request(req, reserved=reserved)

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def wait_for_work(self, timeout: float) -> None:
        self.scheduler.wait_for_work(timeout)

    def step(self) -> None:
        t0 = time.perf_counter()
        sched, out = self.scheduler, self.outputs
        sched.drain_inbox()
        for req in sched.drop_cancelled():
            out.fail(req, CANCELLED, "the request was cancelled by the client")
        self._prefill()
        self._decode()
        out.state(*sched.state())
        self.outbox.poll_cancelled(sched.in_flight())
        t = self.times
        t.steps += 1
        t.step_s += time.perf_counter() - t0
        if sched.idle:
            t.log()

    def _prefill(self) -> None:
        sched, out = self.scheduler, self.outputs
        budget = sched.prefill_chunk
        if (group := sched.next_prefill_group(budget)) is not None:
            budget -= self._prefill_group(*group)
        while (job := sched.next_prefill(budget)) is not None:
            req, chunk = job
            try:
                t0 = time.perf_counter()
                logits = self.dec.prefill(sched.kv.prefill_row, chunk, req.num_computed)
                self.times.prefill_s += time.perf_counter() - t0
                self.times.prefill_tokens += len(chunk)
            except Exception as err:
                log.exception("prefill failed")
                sched.prefill_failed(req)
                out.fail(req, INTERNAL, f"prefill failed: {err}")
                continue
            budget -= len(chunk)
            if not sched.prefilled(req, len(chunk)):
                continue
            self._first_token(req, logits, time.monotonic())
            sched.first_token_done(req)

    def _prefill_group(self, first: int, group: list[Request]) -> int:
        """New prompts prefilled in one call on rows [first, first + len(group)), each
        then sampling its first token as a lone prefill would. Returns the tokens spent."""
        sched, out = self.scheduler, self.outputs
        n = sum(len(r.prompt) for r in group)
        try:
            t0 = time.perf_counter()
            logits = self.dec.prefill_batch(first, [r.prompt for r in group])
            self.times.prefill_s += time.perf_counter() - t0
            self.times.prefill_tokens += n
        except Exception as err:
            log.exception("batched prefill failed")
            sched.group_failed(group)
            for req in group:
                out.fail(req, INTERNAL, f"prefill failed: {err}")
            return n
        now = time.monotonic()
        for i, req in enumerate(group):
            sched.prefilled(req, len(req.prompt), row=first + i)
            self._first_token(req, logits[i], now)
        sched.group_done(group)
        return n

    def _first_token(self, req: Request, logits: np.ndarray, now: float) -> None:
        """A prompt is in: sample its first token, pass it on (and the end, if that was all)."""
        req.last_time = now
        self._accept(req, logits)
        self.outputs.first_token(req, now)
        if req.status.finished:
            self.outputs.finish(req)

    def _decode(self) -> None:
        sched, out = self.scheduler, self.outputs
        rows = sched.decoding
        if not rows:
            return
        tokens = np.array([r.next_token for r in rows], dtype=np.int64)
        lengths = np.array([r.num_computed for r in rows], dtype=np.int64)
        try:
            t0 = time.perf_counter()
            logits = self.dec.decode(tokens, lengths)
            self.times.decode_s += time.perf_counter() - t0
            self.times.decode_tokens += len(tokens)
        except Exception as err:
            log.exception("decode failed")
            for req in sched.decode_failed():
                out.fail(req, INTERNAL, f"decode failed: {err}")
            return
        now = time.monotonic()
        done, gaps = [], []
        for i, req in enumerate(rows):
            req.num_computed += 1
            gap, req.last_time = now - req.last_time, now
            generated = len(req.output)
            self._accept(req, logits[i])
            if req.status.finished:
                done.append(i)
            if len(req.output) > generated:
                gaps.append(gap)
        if gaps:
            out.tokens(gaps)
        if done:
            for i in done:
                out.finish(rows[i])
            sched.finished_decoding(done)

    def _accept(self, req: Request, logits: np.ndarray) -> None:
        """Sample `req`'s next token and pass it on (`req.status` says if it finished)."""
        token, logprob = req.sampler(logits)
        if self.scheduler.append_token(req, token):      # an output token, not EOS
            self.outputs.process_token(req, token, logprob)

    def abort_all(self, kind: str, message: str) -> None:
        """Fail everything in flight (engine failure, unload)."""
        for req in self.scheduler.abort_all():
            self.outputs.fail(req, kind, message)
        self.outputs.state(*self.scheduler.state())   # idle now: no step would zero the gauges


class EngineThread:
    """Runs the engine's steps on a daemon thread; the face model.py talks to."""

    def __init__(self, core: EngineCore, preprocessor, idle_wait: float = 0.05):
        self.core = core
        self.pre = preprocessor
        self.idle_wait = idle_wait
        self.closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    @property
    def vocab_size(self) -> int:
        return self.core.vocab

    def submit(self, req, sink: Sink) -> None:
        """A parsed request (protocol.ParsedRequest, not yet tokenized): refused at once
        with RequestError, or tokenized by a worker and queued (failures through `sink`)."""
        if self.closed:
            raise RequestError(OVER_CAPACITY, "the model is unloading; retry later")
        self.pre.submit(req, sink)

    def _run(self) -> None:
        core = self.core
        while not self._stop.is_set():
            try:
                core.wait_for_work(self.idle_wait)
                if not core.idle:
                    core.step()
            except Exception as err:  # keep serving: fail what was in flight, go on
                log.exception("engine step failed")
                core.abort_all(INTERNAL, f"engine step failed: {err}")

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let requests in flight finish (up to the timeout), fail the rest."""
        self.closed = True
        deadline = time.monotonic() + drain_timeout
        while (self.pre.busy or not self.core.idle) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=10)
        self.pre.close()           # what is still being tokenized fails or lands in the inbox
        self.core.abort_all(INTERNAL, "the model was unloaded before the request finished")
        self.core.outbox.close()
