"""Hand-written hostile requests, sent as raw bytes over one socket each: what the
schema-based fuzzer cannot express (bytes that are not JSON or not UTF-8, nesting and
numbers beyond parsers' limits, bodies over the limit or too slow, requests that are not
HTTP), each with the one answer it must get. Where the connection should stay open, a
normal request follows on the same socket and must be answered.

Beside them, giant prompts (3.8 MB, under the 4 MiB body limit) are sent while a stream
runs: they must be refused at once, and the stream's longest pause is reported.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional

import httpx

from .client import count, openai_error
from .profile import Profile, check
from .stack import ServeStack

CHAT, COMP = "/v1/chat/completions", "/v1/completions"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    status: int
    code: Optional[str] = None     # the OpenAI error code it must carry (None: not checked)
    param: Optional[str] = None    # the `param` it must name (None: not checked)
    keep_alive: bool = True        # a normal request must then be answered on the same connection


def _req(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         version: str = "HTTP/1.1") -> bytes:
    h = {"Host": "reliability", "Content-Type": "application/json", **(headers or {})}
    if method == "POST" and "Transfer-Encoding" not in h and "Content-Length" not in h:
        h["Content-Length"] = str(len(body))
    lines = [f"{method} {path} {version}"] + [f"{k}: {v}" for k, v in h.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _post(path: str, body: Any, **kw) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _req("POST", path, raw, **kw)


def _chat(model: str, content: str = "Say hi.", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def cases(model: str) -> list[Case]:
    m = json.dumps(model)
    chat = lambda **f: _post(CHAT, _chat(model, **f))  # noqa: E731
    comp = lambda **f: _post(COMP, {"model": model, "max_tokens": 2, **f})  # noqa: E731
    return [
        Case("body is not JSON", _post(CHAT, b"{not json"), 400),
        Case("body is a JSON array", _post(CHAT, b"[1, 2]"), 400),
        Case("empty body", _post(CHAT, b""), 400),
        Case("bytes that are not UTF-8", _post(COMP, b"\xff\xfe{\"model\": 1}"), 400),
        Case("NaN temperature", _post(CHAT, ('{"model": %s, "messages": [{"role": "user", "content": "x"}], '
                                              '"temperature": NaN}' % m).encode()), 400, param="temperature"),
        Case("lone surrogate in chat content (\"\\ud800\")",
             _post(CHAT, ('{"model": %s, "messages": [{"role": "user", "content": "a\\ud800b"}]}' % m).encode()),
             400, param="messages.0.content"),
        Case("lone surrogate in a streamed prompt",
             _post(COMP, ('{"model": %s, "prompt": "\\udfff", "stream": true}' % m).encode()), 400, param="prompt"),
        Case("lone surrogate in a field name",
             _post(COMP, ('{"model": %s, "prompt": "x", "\\ud800": 1}' % m).encode()), 400),
        Case("token id 2**63 (beyond int64)", comp(prompt=[2**63]), 400, param="prompt.0"),
        Case("token id beyond the vocabulary", comp(prompt=[2**62]), 400),
        Case("seed 2**64", chat(seed=2**64), 400, param="seed"),
        Case("max_tokens 2**31", chat(max_tokens=2**31), 400, param="max_tokens"),
        Case("a 20,000-digit integer", _post(COMP, ('{"model": %s, "prompt": "x", "seed": %s}'
                                                    % (m, "9" * 20000)).encode()), 400),
        Case("JSON nested 100,000 deep", _post(COMP, ('{"model": %s, "prompt": %s%s}'
                                                      % (m, "[" * 100000, "]" * 100000)).encode()), 400),
        Case("64 prompts x n=8 (512 sequences)", comp(prompt=["hi"] * 64, n=8), 400, param="prompt"),
        Case("4,096 messages", _post(CHAT, {"model": model, "max_tokens": 2, "messages": [
            {"role": "user", "content": "hello there"}] * 4096}), 400, code="context_length_exceeded"),
        Case("3.8 MB prompt (under the body limit)", chat(content="hello world " * 320000), 400,
             code="context_length_exceeded"),
        Case("body over 4 MiB (Content-Length)", _post(COMP, b"x" * (4 * 2**20 + 1)), 413,
             code="request_too_large", keep_alive=False),
        Case("body over 4 MiB (chunked, no length)", _req("POST", COMP, _chunked(b"x" * (4 * 2**20 + 1)),
                                                          {"Transfer-Encoding": "chunked"}), 413,
             code="request_too_large", keep_alive=False),
        Case("unknown model", _post(CHAT, _chat("no-such-model")), 404, code="model_not_found", param="model"),
        Case("malformed version pin", _post(CHAT, _chat(model + "@latest")), 400, code="invalid_model_version"),
        Case("unknown route", _req("GET", "/v1/engines"), 404, code="not_found"),
        Case("wrong method", _req("DELETE", CHAT), 405, code="method_not_allowed"),
        Case("trailing slash", _req("GET", "/v1/models/"), 200),
        Case("NUL, emoji, right-to-left and zero-width text", chat(content="a\x00b \U0001F600 \u202e\u200b end"), 200),
        Case("4 stop strings of 256 characters", chat(stop=["s" * 256] * 4), 200),
        Case("HTTP/1.0 without Host", b"GET /v1/models HTTP/1.0\r\n\r\n", 200, keep_alive=False),
        Case("a request line that is not HTTP", b"GARBAGE\r\n\r\n", 400, code="invalid_http_request",
             keep_alive=False),
        Case("a 200 KB header", _req("GET", "/v1/models", headers={"X-Big": "a" * 200_000}), 400,
             code="invalid_http_request", keep_alive=False),
        Case("Content-Length: abc", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400,
             code="invalid_http_request", keep_alive=False),
        Case("two Content-Lengths", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                    b"Content-Length: 7\r\n\r\n12345", 400, code="invalid_http_request",
             keep_alive=False),
        Case("broken chunked encoding", _req("POST", COMP, b"zz\r\n", {"Transfer-Encoding": "chunked"}), 400,
             code="invalid_http_request", keep_alive=False),
    ]


def _chunked(body: bytes, size: int = 65536) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        body = await reader.read()
    return Reply(status, headers, body)


async def exchange(port: int, data: bytes, follow_up: Optional[bytes], timeout: float) -> tuple[Reply, Optional[Reply]]:
    """Send `data`, read the answer; then, if given and the server kept the connection, the follow-up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
    try:
        async with asyncio.timeout(timeout):
            try:
                writer.write(data)
                await writer.drain()
            except ConnectionError:
                pass  # refused mid-body (over the limit): the answer may still be there
            reply = await _read_reply(reader)
            second = None
            if follow_up is not None and reply.headers.get("connection", "").lower() != "close":
                writer.write(follow_up)
                await writer.drain()
                second = await _read_reply(reader)
            return reply, second
    finally:
        writer.close()


async def _slow_body(port: int, model: str, seconds: float) -> dict[str, Any]:
    """A body sent one byte a second: ADAPTER_BODY_TIMEOUT_S must end it with a 408."""
    body = json.dumps(_chat(model)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t = time.monotonic()
    try:
        async with asyncio.timeout(seconds + 15):
            writer.write(_req("POST", CHAT, b"", {"Content-Length": str(len(body))}))
            read = asyncio.ensure_future(_read_reply(reader))
            for byte in body:
                if read.done():
                    break
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    break
                await asyncio.wait({read}, timeout=1.0)
            reply = await read
    except TimeoutError:
        return {"status": None, "seconds": round(time.monotonic() - t, 1)}
    finally:
        writer.close()
    err = _error(reply)
    return {"status": reply.status, "code": err and err["code"], "seconds": round(time.monotonic() - t, 1)}


def _error(reply: Reply) -> Optional[dict]:
    try:
        return openai_error(json.loads(reply.body))
    except ValueError:
        return None


async def _giant_prompts_beside_a_stream(stack: ServeStack, n: int) -> dict[str, Any]:
    """A stream runs while `n` 3.8 MB prompts arrive at once: its pauses between chunks."""
    big = _chat(stack.model, content="hello world " * 320000)
    times: list[float] = []

    async def stream(http: httpx.AsyncClient) -> None:
        body = _chat(stack.model, content="Count from one to a hundred.", max_tokens=200, ignore_eos=True,
                     stream=True)
        async with http.stream("POST", stack.url + CHAT, json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.monotonic())

    async with httpx.AsyncClient(timeout=120) as http:
        task = asyncio.ensure_future(stream(http))
        while len(times) < 10 and not task.done():
            await asyncio.sleep(0.05)
        t = time.monotonic()
        answers = await asyncio.gather(*(http.post(stack.url + CHAT, json=big) for _ in range(n)))
        refused_in = time.monotonic() - t
        await task
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"giant_prompts": n, "answers": count(f"{r.status_code} {(r.json().get('error') or {}).get('code')}"
                                                 for r in answers),
            "all_refused_within_s": round(refused_in, 2),
            "stream_chunks": len(times), "stream_median_gap_s": round(statistics.median(gaps), 3) if gaps else None,
            "stream_longest_gap_s": round(max(gaps), 3) if gaps else None,
            "_ok": all(r.status_code == 400 for r in answers)}


async def hostile(stack: ServeStack, p: Profile) -> dict[str, Any]:
    normal = _post(CHAT, _chat(stack.model))
    slow = asyncio.ensure_future(_slow_body(stack.port, stack.model, p.body_timeout_s))
    rows, checks = [], []
    for case in cases(stack.model):
        t = time.monotonic()
        try:
            reply, second = await exchange(stack.port, case.request, normal if case.keep_alive else None, 60)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
            rows.append({"case": case.name, "expected": case.status, "status": None, "detail": repr(e)[:120]})
            checks.append(check(f"{case.name}: {case.status}", False, repr(e)[:120]))
            continue
        err = _error(reply) if reply.status >= 400 else None
        row = {"case": case.name, "expected": case.status, "status": reply.status,
               "code": err and err["code"], "param": err and err["param"],
               "seconds": round(time.monotonic() - t, 2)}
        problems = []
        if reply.status != case.status:
            problems.append(f"got {reply.status}")
        if reply.status >= 400 and err is None:
            problems.append(f"not an OpenAI error body: {reply.body[:80]!r}")
        if case.code and (err or {}).get("code") != case.code:
            problems.append(f"code {(err or {}).get('code')!r}")
        if case.param and (err or {}).get("param") != case.param:
            problems.append(f"param {(err or {}).get('param')!r}")
        if case.keep_alive:
            row["next_on_connection"] = None if second is None else second.status
            if second is None or second.status != 200:
                problems.append(f"the next request on the connection got {row['next_on_connection']}")
        rows.append(row)
        checks.append(check(f"{case.name}: {case.status}" + (f" {case.code}" if case.code else ""),
                            not problems, "; ".join(problems)))
    giant = await _giant_prompts_beside_a_stream(stack, 4)
    checks.append(check("4 giant prompts beside a stream: each refused with 400", giant.pop("_ok"), giant["answers"]))
    slow_result = await slow
    rows.append({"case": "a body sent one byte a second", "expected": 408, **slow_result})
    checks.append(check(f"a body slower than ADAPTER_BODY_TIMEOUT_S ({p.body_timeout_s:g} s): 408 request_timeout",
                        slow_result.get("status") == 408 and slow_result.get("code") == "request_timeout",
                        slow_result))
    ready = await asyncio.to_thread(stack.ready)
    checks.append(check("still ready afterwards", ready))
    return {"cases": rows, "giant_prompts": giant, "checks": checks}
