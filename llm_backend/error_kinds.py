"""The error kinds of the backend: one half of a contract with the OpenAI adapter.

Triton's decoupled gRPC stream delivers a model's error as its message string only
(the status code does not survive), so every error message the backend sends starts
with `"<kind>: "`, and the adapter maps the kind to an HTTP answer
(`openai_adapter/errors.py`, `from_model_message`; the table in ARCHITECTURE.md).
`tests/test_contract_error_kinds.py` checks both sides against this list.

A leaf module: no imports from the rest of `llm_backend`, nothing from Triton.
"""

from __future__ import annotations

INVALID = "invalid_request"            # the client's mistake, names the field: 400
CONTEXT = "context_length_exceeded"    # prompt (+ max_tokens) over max_model_len: 400 with this code
OVER_CAPACITY = "over_capacity"        # queue full, unloading: 429 with Retry-After
CANCELLED = "cancelled"                # the client is gone: nobody to answer
INTERNAL = "internal"                  # the engine failed: 500

KINDS = (INVALID, CONTEXT, OVER_CAPACITY, CANCELLED, INTERNAL)

# The pb_utils.TritonError code that goes with each kind (looked up by name in model.py:
# the stub injects TritonError after import).
TRITON_CODES = {INVALID: "INVALID_ARG", CONTEXT: "INVALID_ARG", OVER_CAPACITY: "UNAVAILABLE",
                CANCELLED: "CANCELLED", INTERNAL: "INTERNAL"}


def prefixed(kind: str, message: str) -> str:
    """The message as it goes on the wire: `"<kind>: <message>"`."""
    if kind not in KINDS:
        raise ValueError(f"unknown error kind {kind!r}; add it to llm_backend/error_kinds.py and the adapter")
    return f"{kind}: {message}"


class RequestError(Exception):
    """A request refused or failed with one of the KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(prefixed(kind, message))
        self.kind = kind
        self.message = message
