"""POST /v1/completions: legacy text completions (prompts x n choices)."""
from __future__ import annotations

from typing import Any, Union

from fastapi import Request

from .errors import invalid
from .schemas import CompletionRequest
from .serving import (ChoiceState, Deps, Event, Formatter, Usage, check_common, execute, new_id, resolve_model,
                      sampling)


class CompletionFormatter(Formatter):
    object_full = "text_completion"
    object_chunk = "text_completion"

    def __init__(self, rid: str, model: str, n_choices: int, include_usage: bool, echo: list[str]) -> None:
        super().__init__(rid, model, n_choices, include_usage)
        self.echo = echo  # per choice: the prompt text to repeat, or ""

    def _choice(self, index: int, text: str, finish: Any = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def prefix(self) -> list[dict[str, Any]]:
        return [self.chunk([self._choice(i, e)]) for i, e in enumerate(self.echo) if e]

    def delta(self, ev: Event) -> dict[str, Any]:
        return self.chunk([self._choice(ev.index, ev.text)])

    def finish(self, ev: Event) -> dict[str, Any]:
        return self.chunk([self._choice(ev.index, "", ev.finish_reason)])

    def full(self, choices: list[ChoiceState], usage: Usage) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_full, "created": self.created, "model": self.model,
                "choices": [self._choice(i, (self.echo[i] if self.echo else "") + "".join(c.text),
                                         c.finish_reason or "stop") for i, c in enumerate(choices)],
                "usage": usage.as_dict(), "system_fingerprint": None}


def _check(req: CompletionRequest, prompts: list[Union[str, list[int]]]) -> None:
    if req.logprobs is not None:
        raise invalid("logprobs is not supported by this server", param="logprobs")
    if req.best_of is not None and req.best_of != req.n:
        raise invalid(f"best_of other than n is not supported (received best_of={req.best_of}, n={req.n})",
                      param="best_of")
    if req.suffix:
        raise invalid("suffix is not supported by this server", param="suffix")
    if req.echo and any(not isinstance(p, str) for p in prompts):
        raise invalid("echo needs text prompts on this server, not token ids", param="echo")


async def create_completion(deps: Deps, req: CompletionRequest, raw: Request):
    check_common(req, deps.settings, "completions")
    prompts = req.prompts()
    _check(req, prompts)
    if len(prompts) * req.n > deps.settings.max_n * 8:
        raise invalid(f"prompts x n must be at most {deps.settings.max_n * 8} (received {len(prompts) * req.n})",
                      param="prompt")
    info, version = resolve_model(deps, raw, req.model)
    rid = new_id("cmpl")
    reqs = []
    echo = []
    for p, prompt in enumerate(prompts):
        for j in range(req.n):
            i = p * req.n + j
            reqs.append(sampling(req, info.name, prompt, req.max_tokens,
                                 rid if len(prompts) * req.n == 1 else f"{rid}-{i}", j, version))
            echo.append(prompt if req.echo and isinstance(prompt, str) else "")
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    fmt = CompletionFormatter(rid, req.model, len(reqs), include_usage, echo)
    return await execute(deps, raw, reqs, req.n, req.stream, fmt, info.max_model_len)
