"""What one client got: a request sent the way an OpenAI client sends it, and its outcome.

Every outcome is one of these kinds, and only the first three are acceptable answers:

    complete     200 with a whole answer: JSON choices with a finish_reason, or a stream
                 whose chunks reach a finish_reason and end with `data: [DONE]`
    error_event  200 stream ended by an OpenAI error event, then `data: [DONE]`
    http_error   a 4xx/5xx with the OpenAI body (`Retry-After` on 429 and 503)
    refused      nothing listened on the port (the process was being restarted)
    dropped      the connection closed before any response byte
    cut          the response started and ended without a whole answer or [DONE]
    malformed    an answer that is not OpenAI-shaped (the detail says how)
    hung         no end within the client's own timeout
    cancelled    the client itself left (the cancellation flood)
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Optional

import httpx

OK_KINDS = frozenset({"complete", "error_event", "http_error"})
ERROR_KEYS = frozenset({"message", "type", "param", "code"})


def openai_error(obj: Any) -> Optional[dict]:
    """The inner object of an OpenAI error body `{"error": {"message", "type", "param", "code"}}`, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return None
    err = obj["error"]
    if set(err) != ERROR_KEYS or not isinstance(err["message"], str) or not err["message"]:
        return None
    if not isinstance(err["type"], str) or not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        return None
    return err


@dataclass
class Outcome:
    kind: str
    started: float                   # time.monotonic() when sent
    ended: float = 0.0
    status: Optional[int] = None
    code: Optional[str] = None       # the OpenAI error code (http_error, error_event)
    ttft: Optional[float] = None     # seconds to the first content chunk (streams)
    chunks: int = 0                  # content chunks received
    retry_after: Optional[float] = None
    detail: str = ""
    tag: str = ""                    # what the client asked for (short, long, probe ...)

    @property
    def ok(self) -> bool:
        return self.kind in OK_KINDS

    def label(self) -> str:
        """`complete 200`, `http_error 429 over_capacity`, `cut` ...: what the report counts."""
        parts = [self.kind] + ([str(self.status)] if self.status and self.kind != "complete" else [])
        return " ".join(parts + ([self.code] if self.code else []))

    def as_dict(self, t0: float = 0.0) -> dict[str, Any]:
        d = asdict(self)
        d["started"], d["ended"] = round(self.started - t0, 3), round(self.ended - t0, 3)
        return d


def chat_body(prompt: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": stream, **extra}


async def send(http: httpx.AsyncClient, base: str, model: str, body: dict[str, Any], *, timeout: float,
               tag: str = "", leave_after_chunks: Optional[int] = None) -> Outcome:
    """POST `body` (chat if it has messages, else completions) and classify what came back.
    `leave_after_chunks`: the client disconnects after that many content chunks (0: as
    soon as the response starts)."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    out = Outcome("hung", time.monotonic(), tag=tag)
    try:
        async with asyncio.timeout(timeout):
            async with http.stream("POST", base + path, json={"model": model, **body}) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    _classify_error(out, r, await r.aread())
                elif body.get("stream"):
                    await _read_stream(out, r, leave_after_chunks)
                else:
                    _classify_full(out, await r.aread())
    except TimeoutError:
        out.kind, out.detail = "hung", f"no end within {timeout:g} s"
    except httpx.ConnectError as e:
        out.kind, out.detail = "refused", type(e).__name__
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
        out.kind = "dropped" if out.status is None else "cut"
        out.detail = f"{type(e).__name__}: {e}"[:200]
    except httpx.TimeoutException as e:
        out.kind, out.detail = "hung", type(e).__name__
    except httpx.HTTPError as e:
        out.kind, out.detail = "malformed", f"{type(e).__name__}: {e}"[:200]
    out.ended = time.monotonic()
    return out


def _classify_error(out: Outcome, r: httpx.Response, raw: bytes) -> None:
    try:
        err = openai_error(json.loads(raw))
    except ValueError:
        err = None
    if err is None:
        out.kind, out.detail = "malformed", f"{r.status_code} body is not an OpenAI error: {raw[:120]!r}"
        return
    out.kind, out.code = "http_error", err["code"]
    ra = r.headers.get("retry-after")
    if ra is not None:
        try:
            out.retry_after = float(ra)
        except ValueError:
            out.kind, out.detail = "malformed", f"Retry-After {ra!r}"
    if r.status_code in (429, 503) and out.retry_after is None and r.headers.get("x-should-retry") != "false":
        out.kind, out.detail = "malformed", f"{r.status_code} without Retry-After"


def _classify_full(out: Outcome, raw: bytes) -> None:
    try:
        doc = json.loads(raw)
        choices = doc["choices"]
        whole = bool(choices) and all(c.get("finish_reason") in ("stop", "length") for c in choices)
    except (ValueError, KeyError, TypeError, AttributeError):
        whole = False
    out.kind = "complete" if whole else "malformed"
    if not whole:
        out.detail = f"200 body is not a whole completion: {raw[:120]!r}"


async def _read_stream(out: Outcome, r: httpx.Response, leave_after: Optional[int]) -> None:
    done = finished = False
    err = None
    if leave_after == 0:
        out.kind = "cancelled"
        return
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if done:
            out.kind, out.detail = "malformed", f"data after [DONE]: {data[:80]}"
            return
        if data == "[DONE]":
            done = True
            continue
        if err is not None:
            out.kind, out.detail = "malformed", "an event after the error event, before [DONE]"
            return
        try:
            obj = json.loads(data)
        except ValueError:
            out.kind, out.detail = "malformed", f"event is not JSON: {data[:80]}"
            return
        if "error" in obj:
            err = openai_error(obj)
            if err is None:
                out.kind, out.detail = "malformed", f"error event is not OpenAI-shaped: {data[:120]}"
                return
            out.code = err["code"]
            continue
        for choice in obj.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if piece:
                out.chunks += 1
                if out.ttft is None:
                    out.ttft = time.monotonic() - out.started
            finished = finished or choice.get("finish_reason") in ("stop", "length")
        if leave_after is not None and out.chunks >= leave_after:
            out.kind = "cancelled"
            return  # leaving the context closes the connection: the server sees the client go
    if not done:
        out.kind, out.detail = "cut", f"ended after {out.chunks} chunks without [DONE]"
    elif err is not None:
        out.kind = "error_event"
    elif finished:
        out.kind = "complete"
    else:
        out.kind, out.detail = "malformed", "[DONE] without a finish_reason"


@dataclass
class Clients:
    """Closed-loop clients: each sends, reads the whole answer, and sends again, until
    stopped. A 429 or 503 is honoured the way the OpenAI SDKs do (wait Retry-After, with
    jitter); after a refused or dropped connection a client waits a moment."""

    base: str
    model: str
    make_body: Callable[[int, int], tuple[dict[str, Any], str]]   # (client, request no.) -> (body, tag)
    timeout: float = 120.0
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    max_retry_wait: float = 5.0

    async def _client(self, i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=5.0)) as http:
            n = 0
            while not self.stopping.is_set():
                body, tag = self.make_body(i, n)
                n += 1
                out = await send(http, self.base, self.model, body, timeout=self.timeout, tag=tag)
                self.outcomes.append(out)
                if out.retry_after is not None and out.kind == "http_error":
                    pause = min(out.retry_after, self.max_retry_wait) * rng.uniform(0.75, 1.25)
                elif out.kind in ("refused", "dropped", "cut") or out.status in (429, 503):
                    pause = 0.25
                else:
                    continue
                try:
                    await asyncio.wait_for(self.stopping.wait(), pause)
                except TimeoutError:
                    pass

    async def run(self, n: int, until: Callable[[], Awaitable[None]], drain_timeout: float) -> list[Outcome]:
        """Run `n` clients until `until()` returns, then let each finish its request
        (at most `drain_timeout` s; a request still running then is recorded as hung)."""
        tasks = [asyncio.ensure_future(self._client(i)) for i in range(n)]
        try:
            await until()
        finally:
            self.stopping.set()
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if pending:
            now = time.monotonic()
            self.outcomes += [Outcome("hung", now, now, detail="still running when the part ended")
                              for _ in pending]
        return self.outcomes


@dataclass
class Probe:
    """A small request every `interval` s: when the service answers again after a fault."""

    base: str
    model: str
    interval: float = 0.25
    timeout: float = 30.0  # a slow answer is recorded with its time, not as a hang
    outcomes: list[Outcome] = field(default_factory=list)
    _task: Optional[asyncio.Task] = None

    def start(self) -> "Probe":
        self._task = asyncio.ensure_future(self._loop())
        return self

    async def _loop(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            while True:
                body = {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1, "temperature": 0}
                self.outcomes.append(await send(http, self.base, self.model, body, timeout=self.timeout, tag="probe"))
                await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def served_since(self, t: float) -> bool:
        return any(o.kind == "complete" and o.started >= t for o in self.outcomes)

    def recovery(self, fault_at: float) -> dict[str, Any]:
        """After the fault: how soon the first refusal came, and when answers came back for
        good (the first complete answer sent after the last failed one). A 429 is no
        failure: the service answers, at capacity (the fault's clients fill the slots)."""
        after = [o for o in self.outcomes if o.started >= fault_at]
        failed = [o for o in after if o.kind != "complete" and not (o.ok and o.status == 429)]
        first_fail = min((o.ended for o in failed), default=None)
        last_fail = max((o.started for o in failed), default=fault_at)
        back = min((o.ended for o in after if o.kind == "complete" and o.started >= last_fail), default=None)
        return {"first_refusal_s": None if first_fail is None else round(first_fail - fault_at, 2),
                "served_again_s": None if back is None else round(back - fault_at, 2),
                "probes": len(after), "probes_failed": len(failed),
                "probe_answers": count(o.label() for o in failed)}


def count(labels) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, min(len(v) - 1, int(-(-q * len(v) // 100)) - 1))]
