"""Schemathesis hooks for the reliability suite (SCHEMATHESIS_HOOKS=reliability.schemathesis_hooks).

- Generated bodies name the served model where their `model` is a valid string, so valid
  requests reach generation instead of all stopping at 404 (the 404 path is covered by
  the hand-written cases).
- Generation stays short: a valid `max_tokens` above 8 (up to the context length), or
  none, becomes 8, since a fuzzed request at temperature 2 without a bound runs to the
  context limit (tens of seconds each on a CPU). Values beyond the context are left as
  generated: they must get a 400.
- Every response's status is appended to RELIABILITY_FUZZ_LOG ("METHOD PATH STATUS"),
  the tally the report prints.
"""
from __future__ import annotations

import os
import zlib

import schemathesis

MODEL = os.environ.get("RELIABILITY_MODEL", "smollm2-135m-instruct")
CONTEXT = int(os.environ.get("RELIABILITY_CONTEXT", "2048"))
CAP = 8
LOG = os.environ.get("RELIABILITY_FUZZ_LOG", "")


@schemathesis.hook
def map_body(context, body):
    if not isinstance(body, dict):
        return body
    model = body.get("model")
    if isinstance(model, str) and 1 <= len(model) <= 256:  # only a valid value: a negative case stays negative
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and CAP < value <= CONTEXT:
            body[key] = CAP
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = CAP
    return body


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    # Half the model ids name the served model (GET /v1/models/{model_id} answers 200).
    if not isinstance(path_parameters, dict):
        return path_parameters
    model_id = path_parameters.get("model_id")
    if isinstance(model_id, str) and zlib.crc32(model_id.encode("utf-8", "replace")) % 2:
        path_parameters["model_id"] = MODEL
    return path_parameters


@schemathesis.hook
def after_call(context, case, response):
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{case.operation.method.upper()} {case.operation.path} {response.status_code}\n")
