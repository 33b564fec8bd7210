"""The threads around the scheduler (the vllm_backend structure): Triton's execute()
only parses and submits; tokenizer workers turn prompts into ids (preprocess.py); an
engine thread runs the steps; a responder thread does the IPC."""

from __future__ import annotations

import logging
import queue
import threading
import time

from .error_kinds import INTERNAL, OVER_CAPACITY, RequestError
from .preprocess import Preprocessor
from .scheduler import Scheduler, Sequence, Sink, _ask_cancelled

log = logging.getLogger(__name__)


class Responder:
    """One thread that sends responses, updates metrics and polls cancellation, in
    order, off the engine thread (each of these is an IPC round trip to Triton)."""

    def __init__(self):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self._poll_queued = False
        self._thread = threading.Thread(target=self._run, name="llm-responder", daemon=True)
        self._thread.start()

    def emit(self, fn, *args) -> None:
        self.q.put((fn, args))

    def request_poll(self, seqs: list[Sequence]) -> None:
        """Ask each sequence's sender whether it was cancelled (once per engine step at
        most; skipped while a poll is still queued)."""
        if not self._poll_queued:
            self._poll_queued = True
            self.q.put((self._poll, (seqs,)))

    def _poll(self, seqs: list[Sequence]) -> None:
        self._poll_queued = False
        for seq in seqs:
            if not seq.cancelled and _ask_cancelled(seq):
                seq.cancelled = True

    def _run(self) -> None:
        while True:
            fn, args = self.q.get()
            if fn is None:
                return
            try:
                fn(*args)
            except Exception:
                log.exception("responder: %s failed", getattr(fn, "__name__", fn))

    def close(self, timeout: float = 10.0) -> None:
        self.q.put((None, ()))
        self._thread.join(timeout)


class EngineThread:
    """Runs the scheduler's steps on a daemon thread (the vllm_backend structure: Triton's
    execute() only submits; responses are sent from here)."""

    def __init__(self, scheduler: Scheduler, idle_wait: float = 0.05, *, chars_per_token: int | None = None,
                 tokenize_workers: int = 2):
        self.sched = scheduler
        self.responder = Responder()
        scheduler.responder = self.responder
        scheduler.emit = self.responder.emit
        self.pre = Preprocessor(scheduler, scheduler.tok, chars_per_token=chars_per_token,
                                workers=tokenize_workers)
        self.idle_wait = idle_wait
        self.closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    @property
    def vocab_size(self) -> int:
        return self.sched.vocab

    def submit(self, req, sink: Sink) -> None:
        """A parsed request (protocol.ParsedRequest, not yet tokenized): refused at once
        with RequestError, or tokenized by a worker and queued (failures through `sink`)."""
        if self.closed:
            raise RequestError(OVER_CAPACITY, "the model is unloading; retry later")
        self.pre.submit(req, sink)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sched.wait_for_work(self.idle_wait)
                if not self.sched.idle:
                    self.sched.step()
            except Exception as err:  # keep serving: fail what was in flight, go on
                log.exception("engine step failed")
                self.sched.abort_all(INTERNAL, f"engine step failed: {err}")

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let requests in flight finish (up to the timeout), fail the rest."""
        self.closed = True
        deadline = time.monotonic() + drain_timeout
        while (self.pre.busy or not self.sched.idle) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=10)
        self.pre.close()           # what is still being tokenized fails or lands in the inbox
        self.sched.abort_all(INTERNAL, "the model was unloaded before the request finished")
        self.responder.close()
