"""A small async gRPC client for the `llm` model's tensor interface (bench, tests).

The OpenAI adapter has its own client; this one exists so the benchmark and the
backend's end-to-end tests drive tritonserver exactly as tools speaking the
TensorRT-LLM-style schema do. It lives outside `llm_backend/`, which ships in the
serving image and has no use for it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tritonclient.grpc.aio as grpcclient

_TYPES = {  # input name -> (numpy dtype, Triton type)
    "text_input": (object, "BYTES"), "stop_words": (object, "BYTES"),
    "input_ids": (np.int64, "INT64"),
    "max_tokens": (np.int32, "INT32"), "top_k": (np.int32, "INT32"),
    "temperature": (np.float32, "FP32"), "top_p": (np.float32, "FP32"),
    "presence_penalty": (np.float32, "FP32"), "frequency_penalty": (np.float32, "FP32"),
    "seed": (np.uint64, "UINT64"), "random_seed": (np.uint64, "UINT64"),
    "stream": (bool, "BOOL"), "exclude_input_in_output": (bool, "BOOL"),
    "return_num_input_tokens": (bool, "BOOL"), "return_num_output_tokens": (bool, "BOOL"),
    "return_log_probs": (bool, "BOOL"), "ignore_eos": (bool, "BOOL"),
}


def make_inputs(prompt: str | None = None, **values) -> list[grpcclient.InferInput]:
    """Inputs shaped [1, 1] (lists give [1, k]), as TensorRT-LLM-style clients send them."""
    if prompt is not None:
        values["text_input"] = prompt
    out = []
    for name, value in values.items():
        if value is None:
            continue
        dtype, triton = _TYPES[name]
        items = value if isinstance(value, (list, tuple)) else [value]
        if dtype is object:
            items = [v.encode() if isinstance(v, str) else v for v in items]
        arr = np.array([items], dtype=dtype)
        inp = grpcclient.InferInput(name, list(arr.shape), triton)
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


@dataclass
class Result:
    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    error: str | None = None
    responses: int = 0
    final: bool = False
    start: float = 0.0
    times: list[float] = field(default_factory=list)   # arrival of each non-empty piece
    counts: list[int] = field(default_factory=list)    # num_output_tokens at each, if returned
    finished_at: float | None = None                    # arrival of the finish_reason
    logprobs: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def ttft(self) -> float | None:
        return self.times[0] - self.start if self.times else None


async def generate(client: grpcclient.InferenceServerClient, model: str, prompt: str | None = None,
                   *, cancel_after: int | None = None, request_id: str = "",
                   on_piece: Callable[[str], None] | None = None, **values) -> Result:
    """One request over a decoupled stream; `cancel_after=n` cancels after n responses;
    `on_piece` is called with each non-empty text piece as it arrives."""
    res = Result(start=time.perf_counter())
    values.setdefault("stream", True)

    finished = asyncio.Event()

    async def requests():
        # the aio client has no enable_empty_final_response argument: the parameter is it
        yield {"model_name": model, "inputs": make_inputs(prompt, **values), "request_id": request_id,
               "parameters": {"triton_enable_empty_final_response": True}}
        # Our half stays open until the end: a stream closed early leaves Triton 2.51
        # holding the request, and the model never unloads.
        await finished.wait()

    stream = client.stream_infer(inputs_iterator=requests())
    try:
        async for result, error in stream:
            if error is not None:
                res.error = str(error.message() if hasattr(error, "message") else error)
                res.final = True
                break
            res.responses += 1
            resp = result.get_response()
            text = result.as_numpy("text_output")
            if text is not None:
                piece = text.reshape(-1)[0].decode("utf-8")
                res.pieces.append(piece)
                if piece:
                    res.times.append(time.perf_counter())
                    if on_piece is not None:
                        on_piece(piece)
            for name in ("num_input_tokens", "num_output_tokens"):
                arr = result.as_numpy(name)
                if arr is not None:
                    setattr(res, name, int(arr.reshape(-1)[0]))
            if text is not None and piece and res.num_output_tokens is not None:
                res.counts.append(res.num_output_tokens)
            fr = result.as_numpy("finish_reason")
            if fr is not None:
                res.finish_reason = fr.reshape(-1)[0].decode()
                res.finished_at = time.perf_counter()
            lp = result.as_numpy("output_log_probs")
            if lp is not None:
                res.logprobs += lp.reshape(-1).tolist()
            if resp.parameters["triton_final_response"].bool_param:
                res.final = True
                break
            if cancel_after is not None and res.responses >= cancel_after:
                stream.cancel()
                break
    finally:
        finished.set()
        if not res.final:
            stream.cancel()
    return res
