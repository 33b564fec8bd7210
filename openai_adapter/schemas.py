"""Request schemas of the OpenAI API, with the limits written into the types.

Unknown fields are kept (`extra="allow"`) so serving can log and ignore them: newer
SDKs send fields older servers do not know.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

# Every integer the schema accepts must fit the Triton tensor it becomes
# (triton_client.build_inputs): max_tokens and top_k INT32, seed UINT64 (taken modulo
# 2**64, after + choice index), input_ids INT64. Floats are finite (JSON NaN/Infinity: 400).
INT64_MAX = 2**63 - 1
Temperature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=2.0)]
TopP = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2.0, le=2.0)]
MaxTokens = Annotated[StrictInt, Field(ge=1, le=1_000_000)]  # INT32
StopStr = Annotated[str, Field(min_length=1, max_length=256)]
Stop = Union[StopStr, Annotated[list[StopStr], Field(max_length=4)]]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]  # UINT64 modulo 2**64
N = Annotated[StrictInt, Field(ge=1, le=128)]


def _unencodable(value: Any, path: str = "") -> Optional[tuple[str, str]]:
    """(where, why) for the first string in `value` (a str or nested lists of them)
    that UTF-8 cannot encode, i.e. one holding a lone surrogate such as JSON's "\\ud800"."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, f"a lone surrogate {value[e.start]!r} at character {e.start}"
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _unencodable(item, f"{path}[{i}]")
            if found:
                return found
    return None


def _admits_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(_admits_null(p) for p in prop.get("anyOf", ()))


def _optional_fields_admit_null(schema: dict[str, Any]) -> None:
    """The documented schema says what `_null_means_default` does: a field that is not
    required may be null (meaning "not given"), whatever its type."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name not in required and not _admits_null(prop):
            keep = {k: prop.pop(k) for k in ("default", "title", "description") if k in prop}
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **keep}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_optional_fields_admit_null)

    @model_validator(mode="before")
    @classmethod
    def _field_names_are_unicode(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                found = _unencodable(key)
                if found:
                    raise PydanticCustomError("invalid_unicode", "a field name is not valid Unicode ({why})",
                                              {"why": found[1]})
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _strings_are_unicode(cls, value: Any) -> Any:
        # Every string goes on as UTF-8 (Triton's BYTES tensors, the chat template, error
        # bodies); a lone surrogate failed there as a 500 and reset the connection. Objects
        # inside are models of their own and check their own fields (a precise `param`).
        found = _unencodable(value)
        if found:
            where, why = found
            raise PydanticCustomError(
                "invalid_unicode", "the string {where}is not valid Unicode ({why} cannot be encoded as UTF-8)",
                {"where": f"at {where} " if where else "", "why": why})
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        # Clients send `"n": null` for "not given": treat it so for optional fields.
        if value is None and info.field_name is not None:
            f = cls.model_fields[info.field_name]
            if not f.is_required():
                return f.get_default(call_default_factory=True)
        return value


class StreamOptions(_Open):
    include_usage: StrictBool = False


class ContentPart(_Open):
    type: str
    text: Optional[str] = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]


class _Sampling(_Open):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[Annotated[StrictInt, Field(ge=-1, le=1_000_000)]] = None  # vLLM extension; INT32
    seed: Optional[Seed] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    stop: Optional[Stop] = None
    n: N = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(allow_inf_nan=False, ge=-100, le=100)]]] = None
    user: Optional[str] = None
    ignore_eos: StrictBool = False  # vLLM extension

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_tokens: Optional[MaxTokens] = None
    max_completion_tokens: Optional[MaxTokens] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=20)]] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    functions: Optional[list[dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None


# le: the INT64 input_ids tensor (a larger id failed in the gRPC layer as a plain-text 500)
PromptTokens = Annotated[list[Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]], Field(min_length=1)]
Prompt = Union[str, Annotated[list[str], Field(min_length=1, max_length=64)], PromptTokens,
               Annotated[list[PromptTokens], Field(min_length=1, max_length=64)]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Optional[MaxTokens] = 16
    echo: StrictBool = False
    logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=5)]] = None
    best_of: Optional[Annotated[StrictInt, Field(ge=1, le=128)]] = None
    suffix: Optional[str] = None

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # one token-id prompt
        return list(p)
