"""The error-kind contract between the backend and the adapter (ARCHITECTURE.md, "Error
messages carry their kind"): every kind the backend can send is one of
`llm_backend.error_kinds.KINDS`, and the adapter maps each to its documented answer.

Both sides are imported here and nowhere else together: the adapter never imports the
backend at run time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from llm_backend import error_kinds
from openai_adapter import errors

ROOT = Path(__file__).resolve().parents[1]
# What the backend's messages can reach the adapter from: the backend, and the fake model
# that stands in for it in the adapter's tests.
SOURCES = sorted((ROOT / "llm_backend").glob("*.py")) + [ROOT / "tests" / "fixtures" / "fakellm" / "model.py"]

# kind -> (HTTP status, OpenAI code) as documented; None: the client is gone (ClientGone).
DOCUMENTED = {
    error_kinds.INVALID: (400, None),
    error_kinds.CONTEXT: (400, "context_length_exceeded"),
    error_kinds.OVER_CAPACITY: (429, "over_capacity"),
    error_kinds.CANCELLED: None,
    error_kinds.INTERNAL: (500, "internal_error"),
}


def test_every_kind_has_a_documented_answer():
    assert set(DOCUMENTED) == set(error_kinds.KINDS)
    assert set(error_kinds.TRITON_CODES) == set(error_kinds.KINDS)


@pytest.mark.parametrize("kind", error_kinds.KINDS)
@pytest.mark.parametrize("wire", ["{}", "[StatusCode.INTERNAL] {}"])   # as tritonclient may wrap it
def test_the_adapter_maps_every_kind_the_backend_sends(kind, wire):
    text = "the prompt has 9000 tokens, the limit is 2048"
    mapped = errors.from_model_message(wire.format(error_kinds.prefixed(kind, text)), retry_after=7)
    if DOCUMENTED[kind] is None:
        assert isinstance(mapped, errors.ClientGone)
        return
    status, code = DOCUMENTED[kind]
    assert isinstance(mapped, errors.OpenAIError)
    assert (mapped.status, mapped.code, mapped.message) == (status, code, text)   # prefix stripped
    assert (mapped.retry_after == 7) == (status == 429)


def test_every_prefix_the_adapter_knows_is_a_kind():
    assert all(p.endswith(": ") for p in errors._PREFIXES)
    assert {p[:-2] for p in errors._PREFIXES} == set(error_kinds.KINDS)


def test_the_architecture_table_lists_the_kinds_with_their_triton_codes():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("### Error messages carry their kind", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+): ` \| ([A-Z_]+) \|", section, re.M)
    assert dict(rows) == error_kinds.TRITON_CODES


# -- nothing sends a kind that is not in error_kinds ------------------------------------------------------

_KIND_LIKE = re.compile(r"^([a-z]+(?:_[a-z]+)*): ")
# Calls whose arguments become an error message for a client.
_SENDING = {"TritonError", "RequestError", "InferenceResponse", "prefixed", "send_error", "fail"}


def _name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def _leading_text(node: ast.AST) -> str | None:
    """The literal start of a string or f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    return None


def _kind_strings(tree: ast.AST):
    """(line, word) of every string starting like `"<word>: "` that is sent as an error:
    in the arguments of a _SENDING call, or assigned to a name such a call is given."""
    sent_names = set()
    reached: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node) in _SENDING:
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                reached.append(arg)
                sent_names.update(n.id for n in ast.walk(arg) if isinstance(n, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in sent_names for t in node.targets):
            reached.append(node.value)
    seen = set()
    for root in reached:
        for node in ast.walk(root):
            text = _leading_text(node)
            match = _KIND_LIKE.match(text) if text else None
            if match and (node.lineno, match.group(1)) not in seen:
                seen.add((node.lineno, match.group(1)))
                yield node.lineno, match.group(1)


def _kind_arguments(tree: ast.AST):
    """(line, value) of string literals passed as the kind of an error."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        if _name(node) in ("RequestError", "prefixed", "send_error", "fail"):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_sends_a_kind_that_error_kinds_does_not_list(path):
    """A new kind needs an entry in error_kinds (and so in the adapter, by the tests
    above); kinds are named by the module's constants, not spelled out."""
    if path.name == "error_kinds.py":
        return
    tree = ast.parse(path.read_text(), str(path))
    strings = list(_kind_strings(tree))
    unknown = [(line, word) for line, word in strings if word not in error_kinds.KINDS]
    assert not unknown, f"{path.name}: messages with a kind not in llm_backend/error_kinds.py: {unknown}"
    spelled = strings + list(_kind_arguments(tree))
    assert not spelled, f"{path.name}: kinds spelled out; use error_kinds' constants and prefixed(): {spelled}"


def test_the_source_check_finds_an_unknown_kind():
    tree = ast.parse('raise RequestError("quota_exceeded", "x")\n'
                     'sender.send(InferenceResponse(error=TritonError(f"quota_exceeded: {n} left")))\n'
                     'msg = (f"over_quota: this model allows {k} tokens")\n'
                     'sender.send(InferenceResponse(error=TritonError(msg)))\n'
                     'log.error("responder: %s failed", fn)\n'
                     'lines = [f"backend: {name}"]\n')
    assert sorted(_kind_strings(tree)) == [(2, "quota_exceeded"), (3, "over_quota")]
    assert list(_kind_arguments(tree)) == [(1, "quota_exceeded")]
