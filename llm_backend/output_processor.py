"""From a request's tokens to what its client receives: detokenizing, stop strings,
sending, and the metrics of what was sent.

Text is held back while it could be part of a UTF-8 character or of a stop string
(detokenizer.py); a stop string ends the request (FINISHED_STOPPED) and is never sent.
After the first piece, text goes out once per `stream_interval` tokens (vLLM's and
SGLang's option of that name).
Everything leaves through the outbox (responder.py), in order, off the engine thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer, StopStringBuffer
from .metrics import Metrics, NullMetrics
from .request import Request, RequestStatus


@dataclass(eq=False)
class TextState:
    """A request's output on its way to text."""
    detok: IncrementalDetokenizer
    stops: StopStringBuffer
    logprobs: list[float] = field(default_factory=list)   # of tokens whose text is not sent yet
    tail: str = ""                                        # text released by the finishing token
    unsent: str = ""                                      # text held for the stream interval
    held: int = 0                                         # tokens since the last response
    sent: bool = False                                    # the first piece has gone
    sent_at: float = 0.0                                  # when the last piece went


class OutputProcessor:
    """`add_request` may be called from any thread; the rest from the engine thread."""

    # Text is held at most this long for the stream interval: a slow model still streams,
    # and stays under the adapter's silence probe (ADAPTER_SILENCE_PROBE_S, 0.3 s).
    MAX_HOLD_S = 0.2

    def __init__(self, tokenizer, outbox, metrics: Metrics | None = None, stream_interval: int = 1,
                 clock=time.monotonic):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, not {stream_interval}")
        self.tok = tokenizer
        self.stream_interval = stream_interval
        self.clock = clock
        self.send = outbox.send
        self.metrics = metrics or NullMetrics()
        self._last_state = None

    def add_request(self, req: Request) -> None:
        req.output_state = TextState(IncrementalDetokenizer(self.tok, req.prompt),
                                     StopStringBuffer(req.params.stop))

    def process_token(self, req: Request, token: int, logprob: float | None) -> None:
        """An output token of `req` (`req.status` says if it reached its length): its
        text goes to the client unless the request is finished, or held back; a stop
        string in it finishes the request."""
        st = req.output_state
        if logprob is not None:
            st.logprobs.append(logprob)
        text = st.stops.push(st.detok.push(token))
        st.held += 1
        if st.stops.stopped or req.status is RequestStatus.FINISHED_LENGTH:
            if st.stops.stopped:
                req.status = RequestStatus.FINISHED_STOPPED
            st.tail, st.unsent = st.unsent + text, ""
            return
        st.unsent += text
        # The first text goes at once (time to first token); after it, one response per
        # `stream_interval` tokens (or MAX_HOLD_S): each response costs the serving path
        # (Triton, the adapter, the client) CPU beside the engine's.
        if not st.unsent:
            return
        now = self.clock()
        if st.sent and st.held < self.stream_interval and now - st.sent_at < self.MAX_HOLD_S:
            return
        text, st.unsent, st.held, st.sent, st.sent_at = st.unsent, "", 0, True, now
        logprobs, st.logprobs = st.logprobs, []
        self.send(req.sink.piece, text, logprobs, len(req.prompt), len(req.output))

    def finish(self, req: Request) -> None:
        """The last response of a finished request: the text still held, finish_reason."""
        st = req.output_state
        tail = st.unsent + st.tail                # EOS ends a request without an output token
        if not st.stops.stopped:
            tail += st.stops.push(st.detok.flush())
            tail += st.stops.flush()
        self.send(req.sink.finish, tail, st.logprobs, req.finish_reason, len(req.prompt), len(req.output))

    def fail(self, req: Request, kind: str, message: str) -> None:
        self.send(req.sink.fail, kind, message)

    # -- metrics: output tokens are those of num_output_tokens (an EOS is not one) --------------
    def first_token(self, req: Request, now: float) -> None:
        self.send(self.metrics.first_token, now - req.arrival, len(req.prompt), len(req.output))

    def tokens(self, inter_token_seconds: list[float]) -> None:
        self.send(self.metrics.tokens, len(inter_token_seconds), inter_token_seconds)

    def state(self, waiting: int, running: int, kv_usage: float) -> None:
        """The gauges, sent when they change."""
        state = (waiting, running, kv_usage)
        if state != self._last_state:
            self._last_state = state
            self.send(self.metrics.state, *state)
