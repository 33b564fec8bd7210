"""POST /v1/chat/completions: messages -> the model's chat template -> choices."""
from __future__ import annotations

from typing import Any

from fastapi import Request

from . import chat_template
from .errors import invalid
from .schemas import ChatCompletionRequest
from .serving import (ChoiceState, Deps, Event, Formatter, Usage, check_common, execute, new_id, resolve_model,
                      sampling)


class ChatFormatter(Formatter):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def prefix(self) -> list[dict[str, Any]]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(self.n_choices)]

    def delta(self, ev: Event) -> dict[str, Any]:
        return self.chunk([{"index": ev.index, "delta": {"content": ev.text}, "logprobs": None, "finish_reason": None}])

    def finish(self, ev: Event) -> dict[str, Any]:
        return self.chunk([{"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}])

    def full(self, choices: list[ChoiceState], usage: Usage) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_full, "created": self.created, "model": self.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                             "logprobs": None, "finish_reason": c.finish_reason or "stop"}
                            for i, c in enumerate(choices)],
                "usage": usage.as_dict(), "system_fingerprint": None}


def _check(req: ChatCompletionRequest) -> None:
    if req.logprobs:
        raise invalid("logprobs is not supported by this server", param="logprobs")
    if req.top_logprobs:
        raise invalid("top_logprobs is not supported by this server", param="top_logprobs")
    if req.response_format is not None and req.response_format.type != "text":
        raise invalid(f"response_format {req.response_format.type!r} is not supported; only 'text'",
                      param="response_format")
    if req.tools:
        raise invalid("tools are not supported by this server", param="tools")
    if req.functions:
        raise invalid("functions are not supported by this server", param="functions")
    if req.tool_choice not in (None, "none", "auto"):
        raise invalid("tool_choice is not supported by this server (no tools)", param="tool_choice")


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise invalid(f"content part type {part.type!r} is not supported; only 'text' parts",
                                  param=f"messages.{i}.content.{j}")
                texts.append(part.text)
            content = "\n".join(texts)
        else:
            content = m.content or ""
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


async def create_chat_completion(deps: Deps, req: ChatCompletionRequest, raw: Request):
    check_common(req, deps.settings, "chat")
    _check(req)
    info, version = resolve_model(deps, raw, req.model)
    prompt = chat_template.render(info.chat_template, _messages(req), bos_token=info.bos_token,
                                  eos_token=info.eos_token, model=info.name)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    rid = new_id("chatcmpl")
    reqs = [sampling(req, info.name, prompt, max_tokens, rid if req.n == 1 else f"{rid}-{i}", i, version)
            for i in range(req.n)]
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    fmt = ChatFormatter(rid, req.model, req.n, include_usage)
    return await execute(deps, raw, reqs, req.n, req.stream, fmt, info.max_model_len)
