"""Render a checkpoint's own chat template the way transformers' apply_chat_template does."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import invalid


class TemplateError(Exception):
    """raise_exception() in a template, or a template that cannot be rendered."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, unicode kept.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(source: str, messages: list[dict[str, Any]], *, bos_token: str = "", eos_token: str = "",
           model: str = "") -> str:
    """The prompt text for `messages` with the generation prompt; template errors are 400s."""
    if not source:
        raise invalid(f"model {model!r} has no chat template; use /v1/completions", param="messages")
    try:
        template = _compile(source)
    except jinja2.TemplateError as err:
        raise invalid(f"the chat template of model {model!r} does not compile: {err}", param="messages") from None
    try:
        return template.render(messages=messages, add_generation_prompt=True, bos_token=bos_token,
                               eos_token=eos_token, tools=None, documents=None)
    except TemplateError as err:
        raise invalid(f"chat template: {err}", param="messages") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        raise invalid(f"chat template could not render these messages: {err}", param="messages") from None
