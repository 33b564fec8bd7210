"""The request/response tensors of model_config.py, without Triton.

`parse_request` reads a request's inputs (a `get(name) -> numpy array | None`) into the
prompt (text or ids, not yet tokenized: that happens off Triton's and the engine's
threads, preprocess.py) and SamplingParams; `ResponseSink` turns the output processor's
text pieces into the responses the interface promises (streaming: one per piece with the
token counts so far, then an empty final; otherwise one with the whole text). model.py
supplies the Triton side of both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .error_kinds import INVALID, RequestError
from .sampling import SamplingParams
from .request import check_token_ids


@dataclass
class ParsedRequest:
    text: str | None          # the prompt as text, or
    ids: np.ndarray | None    # as token ids (checked against the vocabulary)
    params: SamplingParams
    stream: bool
    exclude_input: bool
    prompt_text: str = ""     # the prompt again in the output: set once tokenized, when `echo`

    @property
    def echo(self) -> bool:
        """Non-streaming with exclude_input_in_output=false: the output starts with the prompt."""
        return not (self.stream or self.exclude_input)


def _scalar(get, name, cast, default):
    arr = get(name)
    if arr is None:
        return default
    flat = np.asarray(arr).reshape(-1)
    if flat.size == 0:
        return default
    if flat.size != 1:
        raise RequestError(INVALID, f"{name} must hold one value, got {flat.size}")
    try:
        return cast(flat[0])
    except (TypeError, ValueError, OverflowError) as err:
        raise RequestError(INVALID, f"{name}: cannot read {flat[0]!r}") from err


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(INVALID, f"text must be UTF-8 ({err.reason} at byte {err.start})") from err
    return str(value)


def parse_request(get: Callable[[str], np.ndarray | None], vocab_size: int) -> ParsedRequest:
    """Raises RequestError (invalid_request) naming the field, the limit and the value.
    `vocab_size` is the model's (its embedding rows), which may exceed the tokenizer's."""
    ids = get("input_ids")
    text_arr = get("text_input")
    text = None
    if ids is not None and np.asarray(ids).size > 0:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        check_token_ids(ids, vocab_size)   # before decoding: the tokenizer fails on a negative id
    elif text_arr is not None:
        ids = None
        flat = np.asarray(text_arr).reshape(-1)
        if flat.size != 1:
            raise RequestError(INVALID, f"text_input must hold one prompt, got {flat.size}")
        text = _text(flat[0])
    else:
        raise RequestError(INVALID, "text_input (or input_ids) is required")

    stops_arr = get("stop_words")
    stops = [] if stops_arr is None else [_text(s) for s in np.asarray(stops_arr).reshape(-1)]
    seed = _scalar(get, "seed", int, None)
    if seed is None:
        seed = _scalar(get, "random_seed", int, None)
    max_tokens = _scalar(get, "max_tokens", int, None)
    params = SamplingParams(
        temperature=_scalar(get, "temperature", float, None),
        top_p=_scalar(get, "top_p", float, 1.0),
        top_k=_scalar(get, "top_k", int, 0),
        seed=seed,
        presence_penalty=_scalar(get, "presence_penalty", float, 0.0),
        frequency_penalty=_scalar(get, "frequency_penalty", float, 0.0),
        max_tokens=max_tokens,
        ignore_eos=_scalar(get, "ignore_eos", bool, False),
        stop=[s for s in stops if s],
        logprobs=_scalar(get, "return_log_probs", bool, False),
    )
    if params.top_p == 0.0:   # TensorRT-LLM clients send 0 for "unset"
        params.top_p = 1.0
    try:
        params.validate()
    except ValueError as err:
        raise RequestError(INVALID, str(err)) from err
    return ParsedRequest(text=text, ids=ids, params=params,
                         stream=_scalar(get, "stream", bool, False),
                         exclude_input=_scalar(get, "exclude_input_in_output", bool, True))


class Sender(Protocol):
    """The transport: model.py wraps Triton's response sender in this."""

    def send(self, outputs: dict[str, np.ndarray] | None, final: bool) -> None: ...

    def send_error(self, kind: str, message: str) -> None: ...   # also final

    def is_cancelled(self) -> bool: ...


def _text_tensor(text: str) -> np.ndarray:
    return np.array([[text.encode("utf-8")]], dtype=object)


class ResponseSink:
    """A request's Sink (request.py): what the engine sends it becomes Triton responses."""

    def __init__(self, sender: Sender, req: ParsedRequest):
        self.sender = sender
        self.req = req                     # its prompt_text, once tokenized (echo)
        self.stream = req.stream
        self.want_logprobs = req.params.logprobs
        self.text: list[str] = []
        self.logprobs: list[float] = []
        self.done = False

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()

    def _outputs(self, text: str, logprobs: list[float], num_input_tokens: int,
                 num_output_tokens: int) -> dict[str, np.ndarray]:
        out = {"text_output": _text_tensor(text),
               "num_input_tokens": np.array([[num_input_tokens]], dtype=np.int32),
               "num_output_tokens": np.array([[num_output_tokens]], dtype=np.int32)}
        if self.want_logprobs:
            out["output_log_probs"] = np.array([logprobs], dtype=np.float32)
        return out

    def piece(self, text: str, logprobs: list[float], num_input_tokens: int, num_output_tokens: int) -> None:
        """Streaming: a response with the counts so far, so a client that leaves after
        it can be billed the tokens generated up to here."""
        if self.stream:
            self.sender.send(self._outputs(text, logprobs, num_input_tokens, num_output_tokens), final=False)
        else:
            self.text.append(text)
            self.logprobs += logprobs

    def finish(self, text, logprobs, finish_reason, num_input_tokens, num_output_tokens) -> None:
        if self.stream:
            out = self._outputs(text, logprobs, num_input_tokens, num_output_tokens)
        else:
            out = self._outputs(self.req.prompt_text + "".join(self.text) + text, self.logprobs + list(logprobs),
                                num_input_tokens, num_output_tokens)
        out["finish_reason"] = np.array([[finish_reason.encode()]], dtype=object)
        self.done = True
        if self.stream:
            self.sender.send(out, final=False)
            self.sender.send(None, final=True)
        else:
            self.sender.send(out, final=True)

    def fail(self, kind: str, message: str) -> None:
        if not self.done:
            self.done = True
            self.sender.send_error(kind, message)


__all__ = ["ParsedRequest", "parse_request", "ResponseSink"]
