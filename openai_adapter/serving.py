"""Serving logic shared by chat and completions: admission, choices, deadline, disconnect.

A request becomes one `GenerationRequest` per choice (prompts x n). Their streams are
merged into `Event`s. Nothing is sent to the client before the first event arrived, so
failures before the first token get a real HTTP status; later ones become an SSE error
event. Every exit path closes the streams, which cancels the Triton requests.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import Request
from fastapi.responses import JSONResponse

from . import sse
from .accounts import ANONYMOUS, Accounts, Principal, Usage as Billed, reserve_for
from .admission import Admission
from .drain import Drain
from .errors import ClientGone, OpenAIError, deadline_exceeded, invalid, shutting_down
from .metrics import Metrics
from .routing import Router, choose, split_pin
from .schemas import _Sampling
from .settings import Settings
from .stop import StopChecker
from .triton_client import GenerationRequest, LLMClient, ModelInfo

log = logging.getLogger("openai_adapter.serving")


@dataclass
class Deps:
    """Everything a request needs, built once in the lifespan (app.state.deps)."""

    settings: Settings
    client: LLMClient
    admission: Admission
    metrics: Metrics
    accounts: Accounts
    router: Router = field(default_factory=lambda: Router(None))
    drain: Drain = field(default_factory=lambda: Drain(30.0))
    slots: Callable[[str], int] = lambda model: 1  # sequences the model runs at once (admission)
    on_generation_ok: Callable[[str], None] = lambda model: None  # real traffic also proves health
    on_token: Callable[[str], None] = lambda model: None  # so does every token streamed
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def draining(self) -> bool:
        return self.drain.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        if value:  # a drain is not undone
            self.drain.begin()


@dataclass
class Event:
    """Text for one choice; the last event of a choice has `finish_reason` and counts."""

    index: int
    text: str
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far (the final count on the last event)
    model_version: str = ""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    finish_reason: Optional[str] = None


def finish_reason(engine_value: Optional[str]) -> str:
    """Only OpenAI's values: the engine's `length` stays, everything else is `stop`."""
    return "length" if engine_value == "length" else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_common(req: _Sampling, settings: Settings, what: str) -> None:
    """Reject what this server cannot honour, naming the field (400)."""
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed with stream: true", param="stream_options")
    if req.n > settings.max_n:
        raise invalid(f"n must be at most {settings.max_n} on this server (received {req.n})", param="n")
    if req.logit_bias:
        raise invalid("logit_bias is not supported by this server", param="logit_bias")
    if req.model_extra:
        log.info("%s: ignoring unknown fields %s", what, sorted(req.model_extra))


def sampling(req: _Sampling, model: str, prompt: Any, max_tokens: Optional[int], request_id: str,
             choice: int = 0, version: str = "") -> GenerationRequest:
    # With a seed, choice j samples with seed + j: reproducible, yet n different choices.
    seed = None if req.seed is None else req.seed + choice
    # OpenAI's default is temperature 1, while a Triton LLM model without the tensor
    # decodes greedily (the TensorRT-LLM convention our backend follows): send it.
    temperature = 1.0 if req.temperature is None else req.temperature
    # The model reads top_p=0 and top_k=0 as "unset" (TensorRT-LLM convention). OpenAI's
    # top_p=0 keeps only the most likely token: send top_k=1. vLLM's top_k=-1 is "no top-k".
    top_p, top_k = req.top_p, (None if req.top_k == -1 else req.top_k)
    if top_p == 0:
        top_p, top_k = None, 1
    return GenerationRequest(model=model, prompt=prompt, max_tokens=max_tokens, stop=req.stop_list(),
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                             ignore_eos=req.ignore_eos, request_id=request_id, model_version=version)


async def choice_events(deps: Deps, index: int, req: GenerationRequest, started: float) -> AsyncIterator[Event]:
    """One choice's stream as Events, with stop strings cut and latency recorded."""
    m = deps.metrics
    stopper = StopChecker(req.stop)
    reason: Optional[str] = None
    n_in, n_out, pieces = 0, None, 0
    version = ""
    last = None
    stream = deps.client.generate(req)
    try:
        async for chunk in stream:
            t = time.monotonic()
            if last is None:
                m.ttft.labels(req.model).observe(t - started)
            else:
                m.itl.labels(req.model).observe(t - last)
            last = t
            deps.on_token(req.model)
            pieces += 1
            n_in = chunk.num_input_tokens if chunk.num_input_tokens is not None else n_in
            n_out = chunk.num_output_tokens if chunk.num_output_tokens is not None else n_out
            if chunk.finish_reason:
                reason = chunk.finish_reason
            text, hit = stopper.feed(chunk.text)
            version = chunk.model_version or version
            if hit:
                yield Event(index, text, "stop", n_in, n_out if n_out is not None else pieces, version)
                return  # closing the stream cancels the rest of the generation
            if text:
                yield Event(index, text, None, n_in, n_out if n_out is not None else pieces, version)
    finally:
        await stream.aclose()
    m.e2e.labels(req.model).observe(time.monotonic() - started)
    deps.on_generation_ok(req.model)
    yield Event(index, stopper.flush(), finish_reason(reason), n_in, n_out if n_out is not None else pieces, version)


async def merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[Event]:
    """Interleave the choices' streams as they produce; closing this closes them all."""
    if len(streams) == 1:
        try:
            async for ev in streams[0]:
                yield ev
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def drain(s: AsyncIterator[Event]) -> None:
        try:
            async for ev in s:
                await queue.put(ev)
            await queue.put(end)
        except BaseException as err:  # hand failures to the consumer
            await queue.put(err)
            raise

    tasks = [asyncio.ensure_future(drain(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def guarded(raw: Request, awaitable, deadline: float, timeout_s: float, drain: Optional[Drain] = None,
                  retry_after: int = 1):
    """Await while watching for the client leaving, the deadline passing and a drain's end."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(raw))
    ended = drain.ended_future() if drain is not None else None
    try:
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        done, _ = await asyncio.wait({task, watcher} | ({ended} if ended else set()), timeout=remaining,
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        # Wait for them: the caller closes the event stream next, which must not be
        # still running in `task` (shutdown cancels request tasks).
        await asyncio.gather(task, watcher, return_exceptions=True)
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if watcher in done:
        raise ClientGone("client disconnected")
    if ended is not None and ended.done():
        raise shutting_down(retry_after)
    raise deadline_exceeded(timeout_s)


class Formatter:
    """How one API shapes events into chunks and the final body (chat / completions)."""

    object_full = ""
    object_chunk = ""

    def __init__(self, rid: str, model: str, n_choices: int, include_usage: bool) -> None:
        self.id, self.model, self.n_choices, self.include_usage = rid, model, n_choices, include_usage
        self.created = int(time.time())

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": self.object_chunk, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def prefix(self) -> list[dict[str, Any]]:
        return []

    def delta(self, ev: Event) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, ev: Event) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_chunk, "created": self.created, "model": self.model,
                "choices": [], "usage": usage.as_dict()}

    def full(self, choices: list[ChoiceState], usage: Usage) -> dict[str, Any]:
        raise NotImplementedError


class UsageTally:
    """Prompt tokens count once per prompt (not per choice of it); completions add up.
    Every event carries its choice's counts so far, so a request cut short (client
    gone, failure) is still counted with the tokens really generated."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompts: dict[int, int] = {}
        self.completions: dict[int, int] = {}
        self.lengths = 0
        self.model_version = ""

    def add(self, ev: Event) -> None:
        group = ev.index // self.n
        self.prompts[group] = max(self.prompts.get(group, 0), ev.prompt_tokens)
        self.completions[ev.index] = max(self.completions.get(ev.index, 0), ev.completion_tokens)
        self.model_version = ev.model_version or self.model_version
        if ev.finish_reason == "length":
            self.lengths += 1

    def usage(self) -> Usage:
        return Usage(sum(self.prompts.values()), sum(self.completions.values()))


class Accounting:
    """One admitted request's way through the accounts: settled exactly once, with how
    it ended (completed, length, cancelled, failed) and the tokens really generated."""

    def __init__(self, deps: Deps, request_id: str, tally: UsageTally, started: float) -> None:
        self.deps, self.request_id, self.tally, self.started = deps, request_id, tally, started
        self.first_at: Optional[float] = None
        self.outcome: Optional[str] = None  # None: ran to its end
        self.settled = False

    async def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        u = self.tally.usage()
        outcome = self.outcome or ("length" if self.tally.lengths else "completed")
        now = time.monotonic()
        ttft = None if self.first_at is None else int((self.first_at - self.started) * 1000)
        await self.deps.accounts.settle(self.request_id, Billed(u.prompt_tokens, u.completion_tokens, outcome, ttft,
                                                                int((now - self.started) * 1000),
                                                                self.tally.model_version))


def principal(raw: Request) -> Principal:
    return getattr(raw.state, "principal", ANONYMOUS)


def resolve_model(deps: Deps, raw: Request, requested: str) -> tuple[ModelInfo, str]:
    """The model and the version this request goes to (NAME or NAME@N), if the caller's
    key may use it; a model the key may not use gets the same 404 as one that does not
    exist (a key does not learn which models others can use)."""
    name, pinned = split_pin(requested)
    if not principal(raw).may_use(name):
        raise OpenAIError(404, f"the model {name!r} does not exist or your API key may not use it",
                          param="model", code="model_not_found")
    info = deps.client.model(name)
    version = choose(name, deps.router.get(name), deps.client.versions(name), pinned, deps.settings.retry_after_s)
    return info, str(version)


def prompt_bytes(prompt: Any) -> int:
    return len(prompt) if isinstance(prompt, list) else len(prompt.encode("utf-8"))


async def execute(deps: Deps, raw: Request, reqs: list[GenerationRequest], n: int, stream: bool,
                  fmt: Formatter, max_model_len: int = 0):
    """Run the choices and answer: an SSE stream, or one JSON body."""
    settings = deps.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s
    started = time.monotonic()
    reserve = reserve_for([prompt_bytes(r.prompt) for r in reqs], [r.max_tokens for r in reqs], max_model_len)
    if principal(raw).key_id is None:
        # No key of the accounts, so no x-ratelimit headers to give: at capacity, the 429
        # comes before the ledger's reservation and its release (two transactions).
        try:
            deps.admission.refuse_if_full(reqs[0].model, deps.slots(reqs[0].model), len(reqs))
        except OpenAIError as err:
            if reqs[0].model_version:
                err.extra_headers["x-model-version"] = reqs[0].model_version
            raise
    admitted = await deps.accounts.admit(principal(raw), fmt.id, reqs[0].model, reserve)
    headers = dict(admitted.headers)
    if reqs[0].model_version:
        headers["x-model-version"] = reqs[0].model_version  # which version answers (roll-outs)
    guard = dict(drain=deps.drain, retry_after=settings.retry_after_s)
    model = reqs[0].model
    try:
        ticket = await guarded(raw, deps.admission.acquire(model, deps.slots(model), len(reqs)), deadline,
                               settings.request_timeout_s, **guard)
    except ClientGone:
        await deps.accounts.release(fmt.id)
        return JSONResponse({}, status_code=499)
    except OpenAIError as err:
        await deps.accounts.release(fmt.id)
        err.extra_headers.update(headers)
        raise
    except BaseException:
        await deps.accounts.release(fmt.id)
        raise
    events = merge([choice_events(deps, i, r, started) for i, r in enumerate(reqs)])
    tally = UsageTally(n)
    acct = Accounting(deps, fmt.id, tally, started)
    released = False

    async def release() -> None:
        nonlocal released
        if not released:
            released = True
            deps.admission.release(ticket)
            u = tally.usage()
            deps.metrics.prompt_tokens.labels(fmt.model).inc(u.prompt_tokens)
            deps.metrics.completion_tokens.labels(fmt.model).inc(u.completion_tokens)
        await acct.settle()

    handed_over = False
    try:
        try:
            first = await guarded(raw, events.__anext__(), deadline, settings.request_timeout_s, **guard)
            acct.first_at = time.monotonic()
        except StopAsyncIteration:
            first = None
        if stream:
            handed_over = True
            return sse.SSEResponse(_stream_body(first, events, fmt, tally, deadline, settings, acct, deps.drain),
                                   release, headers)
        choices = [ChoiceState() for _ in reqs]

        async def collect() -> None:
            ev = first
            while ev is not None:
                _apply(choices[ev.index], ev, tally)
                ev = await anext(events, None)

        await guarded(raw, collect(), deadline, settings.request_timeout_s, **guard)
        return JSONResponse(fmt.full(choices, tally.usage()), headers=headers)
    # Before the first event or while collecting a whole answer; a stream's own ending is
    # recorded by _stream_body.
    except ClientGone:
        acct.outcome = "cancelled"
        return JSONResponse({}, status_code=499)  # nobody reads it; logged as 499
    except OpenAIError as err:
        acct.outcome = "failed"
        err.extra_headers.update(headers)
        raise
    except BaseException:
        acct.outcome = "failed"
        raise
    finally:
        if not handed_over:
            await events.aclose()
            await release()


def _apply(state: ChoiceState, ev: Event, tally: UsageTally) -> None:
    if ev.text:
        state.text.append(ev.text)
    if ev.finish_reason is not None:
        state.finish_reason = ev.finish_reason
    tally.add(ev)


async def _stream_body(first: Optional[Event], events: AsyncIterator[Event], fmt: Formatter, tally: UsageTally,
                       deadline: float, settings: Settings, acct: Accounting, drain: Drain) -> AsyncIterator[bytes]:
    try:
        for c in fmt.prefix():
            yield sse.event(c)
        ev = first
        while ev is not None:
            tally.add(ev)
            if ev.text:
                yield sse.event(fmt.delta(ev))
            if ev.finish_reason is not None:
                yield sse.event(fmt.finish(ev))
            async with asyncio.timeout_at(deadline) as timeout:
                with drain.bounding(timeout):  # the shutdown's grace period ends it too
                    ev = await anext(events, None)
        if fmt.include_usage:
            yield sse.event(fmt.usage_chunk(tally.usage()))
    except TimeoutError:
        acct.outcome = "failed"
        err = shutting_down(settings.retry_after_s) if drain.ended else deadline_exceeded(settings.request_timeout_s)
        yield sse.event(err.body())
    except OpenAIError as err:
        acct.outcome = "failed"
        yield sse.event(err.body())
    except ClientGone:
        acct.outcome = "cancelled"
        return
    except (asyncio.CancelledError, GeneratorExit):
        acct.outcome = "cancelled"  # the client went away
        raise
    except Exception:  # a bug here must still end the stream the way clients understand
        acct.outcome = "failed"
        log.exception("stream failed")
        yield sse.event(OpenAIError(500, "internal server error", code="internal_error").body())
    finally:
        await events.aclose()
    # Settled before [DONE]: a client that sends its next request at once finds its
    # key's concurrency and budget already up to date.
    await acct.settle()
    yield sse.DONE
