"""Property tests over the request schemas: every value the API accepts works or gets a 400.

Bodies are valid requests with one field replaced by a hostile value: integers at the
type boundaries (int32, int64, uint64) and at each field's limits, NaN and infinities,
strings that are not valid Unicode (a lone surrogate sent as the JSON escape "\\ud800"),
values of the wrong type. The answer must be a 200 (streaming: a whole SSE stream ending
with `data: [DONE]`) or a 4xx with the OpenAI error body, never a 5xx; a 400 caused by
the replaced field names it in `param`. The fake client builds the real Triton input
tensors (`build_inputs`, what the gRPC pool does), so a value that cannot be encoded
fails here the way it fails against Triton.
"""
from __future__ import annotations

import json
import math
import threading
import time
from typing import Any, Optional

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from adapter_testlib import FakeClient  # type: ignore[import-not-found]
from openai_adapter.app import create_app
from openai_adapter.settings import Settings
from openai_adapter.triton_client import Chunk, build_inputs
from stack.ports import free_port

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MAX_N = 8  # the server's default ADAPTER_MAX_N
INT32, INT64, UINT64 = 2**31, 2**63, 2**64

# Deterministic (CI must not flake) and bounded: about 20 s for the whole module.
PROPS = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class EncodingClient(FakeClient):
    """The fake model, but every request first becomes the real Triton input tensors."""

    async def generate(self, req):
        build_inputs(req)  # raises where Triton's client would: text .encode(), INT32/INT64/UINT64 casts
        self.requests.append(req)
        n = min(req.max_tokens or 2, 2)
        for i in range(n):
            last = i == n - 1
            yield Chunk("tok ", "length" if last else None, 3 if last else None, i + 1 if last else None)


# -- values --------------------------------------------------------------------------
_LIMITS = [0, 1, 2, 4, 5, 8, 16, 20, 64, 100, 128, 256, 4096, 1_000_000, 2**15, 2**16, 2**53,
           INT32, 2**32, INT64, UINT64]
BOUNDARY_INTS = sorted({s * (b + d) for b in _LIMITS for d in (-1, 0, 1) for s in (1, -1)})
ODD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1e-300, 1e308, 1.7976931348623157e308,
              2.0000000000000004, 1.9999999999999998, 1.0000000000000002, -2.0000000000000004,
              100.00000000000001, 1e20]
LONE_SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)

ints = st.one_of(st.sampled_from(BOUNDARY_INTS), st.integers())
floats = st.one_of(st.sampled_from(ODD_FLOATS), st.floats())
bad_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), LONE_SURROGATE, st.text(max_size=4))
texts = st.one_of(st.text(max_size=12), bad_text, st.sampled_from(["", "\x00", "x" * 257, "fake", "\U0001F600"]))
scalars = st.one_of(ints, floats, texts, st.booleans(), st.none())
hostile = st.one_of(scalars, scalars, bad_text, st.lists(scalars, max_size=3),
                    st.lists(st.lists(ints, max_size=3), max_size=2), st.dictionaries(texts, scalars, max_size=2))


def bad_unicode(value: Any) -> bool:
    """A str (or nested lists of str) that UTF-8 cannot encode."""
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    return isinstance(value, list) and any(bad_unicode(v) for v in value)


# -- valid requests ------------------------------------------------------------------
def _valid_common() -> dict[str, st.SearchStrategy]:
    return {
        "temperature": st.one_of(st.sampled_from([0, 0.0, 2, 2.0, 1e-300]), st.floats(0, 2)),
        "top_p": st.one_of(st.sampled_from([0, 1, 0.0, 1.0]), st.floats(0, 1)),
        "top_k": st.one_of(st.sampled_from([-1, 0, 1, 1_000_000]), st.integers(-1, 1_000_000)),
        "seed": st.one_of(st.sampled_from([-INT64, -1, 0, INT32, INT64 - 1, INT64, UINT64 - 1]),
                          st.integers(-INT64, UINT64 - 1)),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "n": st.integers(1, MAX_N),
        "stop": st.one_of(st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8), max_size=4)),
        "user": st.text(max_size=8),
        "ignore_eos": st.booleans(),
        "max_tokens": st.one_of(st.sampled_from([1, 1_000_000]), st.integers(1, 1_000_000)),
    }


def valid_body(endpoint: str) -> st.SearchStrategy[dict]:
    common = _valid_common()
    if endpoint == CHAT:
        content = st.one_of(st.text(max_size=16), st.lists(st.builds(lambda t: {"type": "text", "text": t},
                                                                     st.text(max_size=8)), min_size=1, max_size=2))
        message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content},
                                        optional={"name": st.text(min_size=1, max_size=8)})
        required = {"model": st.just("fake"), "messages": st.lists(message, min_size=1, max_size=3)}
        common["max_completion_tokens"] = st.integers(1, 1_000_000)
    else:
        tokens = st.lists(st.one_of(st.sampled_from([0, INT32, INT64 - 1]), st.integers(0, INT64 - 1)),
                          min_size=1, max_size=4)
        prompt = st.one_of(st.text(max_size=16), st.lists(st.text(max_size=8), min_size=1, max_size=3), tokens,
                           st.lists(tokens, min_size=1, max_size=3))
        required = {"model": st.just("fake"), "prompt": prompt}
    return st.fixed_dictionaries(required, optional={**common, "stream": st.booleans()})


# Where a hostile value goes: (path, what the body needs there first).
CHAT_TARGETS: list[tuple[tuple, dict]] = [
    (("model",), {}), (("messages",), {}), (("messages", 0, "content"), {}), (("messages", 0, "name"), {}),
    (("messages", 0, "role"), {}),
    (("messages", 0, "content", 0, "text"),
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    (("max_completion_tokens",), {}), (("logprobs",), {}), (("top_logprobs",), {}), (("tool_choice",), {}),
    (("response_format",), {}), (("tools",), {}),
]
COMP_TARGETS: list[tuple[tuple, dict]] = [
    (("prompt",), {}), (("prompt", 1), {"prompt": ["a", "b"]}), (("prompt", 1), {"prompt": [1, 2]}),
    (("prompt", 0, 1), {"prompt": [[1, 2], [3]]}), (("echo",), {}), (("best_of",), {}), (("logprobs",), {}),
    (("suffix",), {}),
]
COMMON_TARGETS: list[tuple[tuple, dict]] = [
    ((f,), {}) for f in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty", "n",
                         "max_tokens", "stop", "user", "stream", "stream_options", "logit_bias", "ignore_eos")
] + [(("stop", 1), {"stop": ["a", "b"]}), (("stream_options", "include_usage"), {"stream": True, "stream_options": {}})]

# The forwarded numbers: what the schema must accept exactly (everything else: 400 naming it).
INT_RANGES = {"max_tokens": (1, 1_000_000), "max_completion_tokens": (1, 1_000_000), "top_k": (-1, 1_000_000),
              "seed": (-INT64, UINT64 - 1), "n": (1, MAX_N)}
FLOAT_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}


def put(body: dict, path: tuple, value: Any) -> None:
    node: Any = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@st.composite
def mutated(draw, endpoint: str, values: Optional[st.SearchStrategy] = None) -> tuple[dict, tuple, Any]:
    """(body, path, value): a valid body with the value (hostile unless given) at path."""
    body = draw(valid_body(endpoint))
    path, setup = draw(st.sampled_from((CHAT_TARGETS if endpoint == CHAT else COMP_TARGETS) + COMMON_TARGETS))
    body.update(json.loads(json.dumps(setup)))  # a fresh copy
    if values is None:  # more of what the target is likely to get wrong: its numbers
        values = st.one_of(hostile, ints if path[-1] in INT_RANGES or isinstance(path[-1], int) else
                           floats if path[-1] in FLOAT_RANGES else texts)
    value = draw(values)
    put(body, path, value)
    return body, path, value


# -- the property --------------------------------------------------------------------
def raw_json(body: dict) -> str:
    # json.dumps writes a lone surrogate as its "\ud800" escape and NaN/Infinity as such.
    return json.dumps(body)


def check_answer(r: httpx.Response, body: dict, path: Optional[tuple] = None, value: Any = None) -> None:
    assert r.status_code < 500, (r.status_code, r.text, body)
    if r.status_code == 200:
        if body.get("stream") is True:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.text.endswith("data: [DONE]\n\n"), r.text[-200:]
            events = [b[len("data: "):] for b in r.text.split("\n\n") if b.strip()]
            assert all(not isinstance(e := json.loads(d), dict) or "error" not in e for d in events[:-1]), r.text
        else:
            assert r.json()["choices"], r.text
        return
    err = r.json()
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
    assert isinstance(err["error"]["message"], str) and err["error"]["message"] and err["error"]["type"], err
    if path is None:
        return
    field, param = path[0], err["error"]["param"]
    if r.status_code == 400:
        assert param is not None and param.split(".")[0] == field, (err, path, value)
    where = ".".join(map(str, path))
    if bad_unicode(value):
        assert r.status_code == 400 and "not valid Unicode" in err["error"]["message"], (err, path)
        assert where == param or where.startswith(param + "."), (err, path)


def check_numbers(r: httpx.Response, body: dict, path: tuple, value: Any) -> None:
    """A forwarded number is accepted exactly within its range (which fits its tensor)."""
    if len(path) != 1 or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    field = path[0]
    if field in INT_RANGES and isinstance(value, int):
        lo, hi = INT_RANGES[field]
        ok = lo <= value <= hi
    elif field in FLOAT_RANGES:
        lo, hi = FLOAT_RANGES[field]
        try:
            ok = math.isfinite(float(value)) and lo <= value <= hi
        except OverflowError:
            ok = False
    else:
        return
    if ok:
        assert r.status_code == 200, (r.status_code, r.text, body)
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (r.status_code, r.text, body)


@pytest.fixture(scope="module")
def tc():
    app = create_app(Settings(), client=EncodingClient())
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def post(client, endpoint: str, body: dict) -> httpx.Response:
    return client.post(endpoint, content=raw_json(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("endpoint", [CHAT, COMP])
@PROPS
@given(data=st.data())
def test_valid_requests_succeed(tc, endpoint, data):
    body = data.draw(valid_body(endpoint))
    r = post(tc, endpoint, body)
    assert r.status_code == 200, (r.text, body)
    check_answer(r, body)


@pytest.mark.parametrize("endpoint", [CHAT, COMP])
@settings(PROPS, max_examples=500)
@given(data=st.data())
def test_one_hostile_field_works_or_gets_a_400_naming_it(tc, endpoint, data):
    body, path, value = data.draw(mutated(endpoint))
    r = post(tc, endpoint, body)
    event(f"{r.status_code} {'lone surrogate' if bad_unicode(value) else type(value).__name__}")
    check_answer(r, body, path, value)
    check_numbers(r, body, path, value)


@pytest.mark.parametrize("endpoint", [CHAT, COMP])
@PROPS
@given(data=st.data())
def test_a_lone_surrogate_anywhere_gets_a_400_naming_the_field(tc, endpoint, data):
    text_not_unicode = st.one_of(bad_text, st.builds(lambda a, b: [*a, b], st.lists(st.text(max_size=3), max_size=2),
                                                     bad_text))
    body, path, value = data.draw(mutated(endpoint, text_not_unicode))
    r = post(tc, endpoint, body)
    assert r.status_code == 400, (r.text, body)
    check_answer(r, body, path, value)  # "not valid Unicode", param names the field


@pytest.mark.parametrize("endpoint", [CHAT, COMP])
@PROPS
@given(data=st.data(), key=texts, value=hostile)
def test_unknown_fields_are_ignored_unless_their_name_is_not_unicode(tc, endpoint, data, key, value):
    body = data.draw(valid_body(endpoint))
    body["x_" + key] = value
    r = post(tc, endpoint, body)
    if bad_unicode(key):
        assert r.status_code == 400 and "field name is not valid Unicode" in r.json()["error"]["message"], r.text
    else:
        assert r.status_code == 200, (r.text, body)
    check_answer(r, body)


# The cases from the issue, by name: each must be a 400 naming the field.
SURROGATE_CASES = [
    (CHAT, {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages.0.content.0.text"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages.0.name"),
    (CHAT, {"model": "fa\udc00ke"}, "model"),
    (COMP, {"prompt": "\ud800"}, "prompt"),
    (COMP, {"prompt": ["ok", "\ud800"]}, "prompt"),
    (COMP, {"stop": "\ud800"}, "stop"),
    (COMP, {"stop": ["ok", "\udbff"]}, "stop"),
    (COMP, {"user": "\ud800"}, "user"),
    (COMP, {"stream": True, "stream_options": {"include_usage": "\ud800"}}, "stream_options.include_usage"),
]
BOUNDARY_CASES = [
    (COMP, {"max_tokens": INT32}, "max_tokens"), (COMP, {"max_tokens": 1_000_001}, "max_tokens"),
    (COMP, {"top_k": INT32}, "top_k"), (COMP, {"top_k": -2}, "top_k"),
    (COMP, {"seed": UINT64}, "seed"), (COMP, {"seed": -INT64 - 1}, "seed"),
    (COMP, {"prompt": [INT64]}, "prompt.0"), (COMP, {"prompt": [[1], [-1]]}, "prompt.1.0"),
    (COMP, {"temperature": math.nan}, "temperature"), (COMP, {"top_p": math.inf}, "top_p"),
    (COMP, {"presence_penalty": -math.inf}, "presence_penalty"),
    (COMP, {"logit_bias": {"1": math.nan}}, "logit_bias.1"),
]


def _base(endpoint: str) -> dict:
    if endpoint == CHAT:
        return {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {"model": "fake", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint,fields,param", SURROGATE_CASES + BOUNDARY_CASES)
def test_issue_cases_get_a_400_naming_the_field(tc, endpoint, fields, param, stream):
    body = {**_base(endpoint), "stream": stream, **fields}
    r = post(tc, endpoint, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error", r.text


@pytest.mark.parametrize("fields", [{"seed": UINT64 - 1, "n": MAX_N}, {"seed": -INT64}, {"top_k": 1_000_000},
                                    {"max_tokens": 1_000_000}, {"prompt": [INT64 - 1, 0]},
                                    {"prompt": "paired \ud83d\ude00 escape"},  # JSON's escape pair: one emoji
                                    {"stop": "\x00"}])
def test_values_at_the_limits_work(tc, fields):
    r = post(tc, COMP, {**_base(COMP), **fields})
    assert r.status_code == 200, r.text


# -- over a real server: one keep-alive connection survives every hostile request ----
@pytest.fixture(scope="module")
def server_url():
    port = free_port()
    app = create_app(Settings(), client=EncodingClient())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_keep_alive=60))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def conn(server_url):
    with httpx.Client(base_url=server_url, timeout=10,
                      limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as client:
        yield client


def _local_addr(r: httpx.Response):
    try:
        return r.extensions["network_stream"].get_extra_info("client_addr")
    except OSError:  # the socket is closed already
        return None


def _send_then_normal(conn: httpx.Client, endpoint: str, body: dict) -> tuple[httpx.Response, Any]:
    r = post(conn, endpoint, body)
    addr = _local_addr(r)
    assert addr is not None, f"the server closed the connection after answering {r.status_code}: {r.text[:200]}"
    ok = post(conn, CHAT, {**_base(CHAT), "stream": True})
    assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n"), ok.text
    assert _local_addr(ok) == addr, "the connection was closed after the previous request"
    return r, addr


@pytest.mark.parametrize("stream", [False, True])
def test_keep_alive_survives_the_issue_cases(conn, stream):
    addrs = set()
    for endpoint, fields, param in SURROGATE_CASES + BOUNDARY_CASES:
        r, addr = _send_then_normal(conn, endpoint, {**_base(endpoint), "stream": stream, **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        addrs.add(addr)
    assert len(addrs) == 1, f"the requests used {len(addrs)} connections, not one"


@pytest.mark.parametrize("endpoint", [CHAT, COMP])
@settings(PROPS, max_examples=150)
@given(data=st.data())
def test_keep_alive_survives_hostile_requests(conn, endpoint, data):
    body, path, value = data.draw(mutated(endpoint))
    r, _ = _send_then_normal(conn, endpoint, body)
    check_answer(r, body, path, value)
