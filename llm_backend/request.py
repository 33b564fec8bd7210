"""A request inside the engine: its token ids, its sampling state, and its status.

A request's status says where it is (vLLM's `RequestStatus`); each status is set by one
module:

    WAITING ──▶ PREFILLING ──▶ DECODING ──▶ FINISHED_STOPPED | FINISHED_LENGTH
       (scheduler.py: a slot)    (scheduler.py: the prompt is in the KV cache)
    any unfinished ──▶ FINISHED_CANCELLED (the client left) | FINISHED_FAILED (engine
                       failure, unload)

EOS and the length limits are found by the scheduler, stop strings by the output
processor (they are text). Importable without Triton.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .error_kinds import CONTEXT, INVALID, RequestError
from .sampling import Sampler, SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 1               # admitted, queued for a KV slot
    PREFILLING = 2            # holds a slot; its prompt is computed, a chunk per step
    DECODING = 3              # holds a slot; one token per step
    FINISHED_STOPPED = 4      # EOS or a stop string: finish_reason "stop"
    FINISHED_LENGTH = 5       # max_tokens or the context: finish_reason "length"
    FINISHED_CANCELLED = 6    # the client left
    FINISHED_FAILED = 7       # the engine failed or was unloaded

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length"}


class Sink(Protocol):
    """Where a request's output goes (protocol.ResponseSink: Triton responses)."""

    def is_cancelled(self) -> bool: ...

    def piece(self, text: str, logprobs: list[float], num_input_tokens: int,
              num_output_tokens: int) -> None: ...   # output tokens so far, this piece's included

    def finish(self, text: str, logprobs: list[float], finish_reason: str,
               num_input_tokens: int, num_output_tokens: int) -> None: ...

    def fail(self, kind: str, message: str) -> None: ...


def sink_cancelled(sink: Sink) -> bool:
    """Whether the client left (a sender that cannot answer is as good as gone)."""
    try:
        return bool(sink.is_cancelled())
    except Exception:
        return True


def check_token_ids(ids, vocab_size: int) -> None:
    """Raises invalid_request for an id outside the model's vocabulary (a list or an array)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise RequestError(INVALID, f"input_ids[{i}] is {int(arr[i])}: token ids must be in [0, {vocab_size}), "
                                    f"the vocabulary size is {vocab_size}")


def token_budget(n: int, max_tokens: int | None, max_model_len: int) -> int:
    """The completion's token budget for an `n`-token prompt; raises
    context_length_exceeded with both numbers when it does not fit."""
    if max_tokens is None:
        if n >= max_model_len:
            raise RequestError(CONTEXT, f"this model's maximum context length is {max_model_len} tokens, "
                                        f"but the prompt has {n} tokens")
        return max_model_len - n
    if n + max_tokens > max_model_len:
        raise RequestError(CONTEXT, f"this model's maximum context length is {max_model_len} tokens, "
                                    f"but {n + max_tokens} were requested ({n} in the prompt, "
                                    f"{max_tokens} for the completion)")
    return max_tokens


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    max_tokens: int                      # the completion's budget (token_budget)
    sampler: Sampler
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0                # KV positions filled
    output: list[int] = field(default_factory=list)
    next_token: int = -1                 # sampled, not yet in the KV cache
    last_time: float = 0.0               # when its last token was sampled
    cancelled: bool = False              # set by the responder's poll; the scheduler acts on it
    output_state: Any = None             # the output processor's (text held back, log-probs)

    @classmethod
    def new(cls, prompt: list[int], params: SamplingParams, sink: Sink, *, max_model_len: int,
            vocab_size: int) -> "Request":
        """Validate a tokenized prompt; raises RequestError for the caller to report."""
        n = len(prompt)
        if n == 0:
            raise RequestError(INVALID, "the prompt is empty (text_input or input_ids)")
        max_tokens = token_budget(n, params.max_tokens, max_model_len)   # first: cheap for any length
        check_token_ids(prompt, vocab_size)
        return cls(prompt=list(prompt), params=params, sink=sink, max_tokens=max_tokens,
                   sampler=Sampler(params, vocab_size))

    @property
    def finish_reason(self) -> str:
        return _FINISH_REASONS.get(self.status, "")
