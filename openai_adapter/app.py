"""The FastAPI app: lifespan-built dependencies, gate middleware, and routers without logic."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors, openapi
from .accounts import Accounts
from .admission import Admission
from .drain import Drain
from .errors import OpenAIError
from .health import Health, Prober, StaticHealth
from .metrics import Metrics, RequestCounter
from .routing import Router, choose
from .schemas import ChatCompletionRequest, CompletionRequest
from .serving import Deps, principal, resolve_model
from .serving_chat import create_chat_completion
from .serving_completions import create_completion
from .settings import Settings
from .triton_client import LLMClient, TritonPool

log = logging.getLogger("openai_adapter")

# -- routers: parse, hand over, nothing else ----------------------------------------
v1 = APIRouter(prefix="/v1")
ops = APIRouter()


@v1.get("/models", responses=openapi.MODELS)
async def list_models(raw: Request) -> dict[str, Any]:
    deps: Deps = raw.app.state.deps
    who = principal(raw)
    return {"object": "list", "data": [_model_card(m.name, deps) for m in deps.client.models() if who.may_use(m.name)]}


@v1.get("/models/{model_id:path}", responses=openapi.MODEL)
async def get_model(model_id: str, raw: Request) -> dict[str, Any]:
    deps: Deps = raw.app.state.deps
    resolve_model(deps, raw, model_id)  # 404 unless it exists for this key (a pinned version must be loaded)
    return _model_card(model_id, deps)


@v1.post("/chat/completions", responses=openapi.CHAT)
async def chat_completions(body: ChatCompletionRequest, raw: Request):
    return await create_chat_completion(raw.app.state.deps, body, raw)


@v1.post("/completions", responses=openapi.COMPLETIONS)
async def completions(body: CompletionRequest, raw: Request):
    return await create_completion(raw.app.state.deps, body, raw)


@ops.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "live"}


@ops.get("/health/ready", responses=openapi.READY)
async def ready(raw: Request) -> JSONResponse:
    deps: Deps = raw.app.state.deps
    ok, details = raw.app.state.health.status()
    if deps.draining:
        ok, details = False, {**details, "draining": True}
    if ok:
        return JSONResponse({"status": "ready", **details})
    # Not ready is an error like any other: the OpenAI error body, plus the details.
    err = errors.unavailable("not ready: " + ("draining" if deps.draining else "see models and circuits"),
                             deps.settings.retry_after_s, code="not_ready")
    return JSONResponse({**err.body(), "status": "not ready", **details}, status_code=503, headers=err.headers())


@ops.get("/metrics", response_class=PlainTextResponse, responses=openapi.METRICS)
async def metrics(raw: Request) -> Response:
    return Response(raw.app.state.deps.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(name: str, deps: Deps) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": deps.created, "owned_by": "triton"}


# -- gate: draining, API keys, body size and time (before any parsing) --------------
HEALTH = frozenset({"/health/live", "/health/ready"})  # the only routes without a key
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _TooLarge(Exception):
    pass


class Gate:
    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deps: Deps = self.state.deps
        path: str = scope.get("path", "")
        if len(path) > 1 and path.endswith("/"):
            # The same answer as without the slash: no redirect (whose Location would
            # echo the client's Host header) and no second spelling of a route.
            path = path.rstrip("/") or "/"
            scope = {**scope, "path": path, "raw_path": path.encode("latin-1")}
        if path in HEALTH:
            await self.app(scope, receive, send)
            return
        if deps.drain.refusing:
            return await _reject(send, errors.shutting_down(deps.settings.retry_after_s))
        deps.drain.active += 1  # the drain waits for this request
        try:
            await self._checked(deps, path, scope, receive, send)
        finally:
            deps.drain.active -= 1

    async def _checked(self, deps: Deps, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        s = deps.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            who = await deps.accounts.authenticate(path, headers.get("authorization", ""))
        except OpenAIError as err:
            return await _reject(send, err)
        scope.setdefault("state", {})["principal"] = who
        too_big = OpenAIError(413, f"the request body is larger than the limit of {s.max_body_bytes} bytes",
                              code="request_too_large")
        length = headers.get("content-length")
        if length is not None:
            try:
                if int(length) > s.max_body_bytes:
                    return await _reject(send, too_big)
            except ValueError:
                return await _reject(send, errors.invalid("invalid Content-Length header"))
        if scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        # Read the body whole here, under the size limit and within the time limit (a
        # client that stalls mid-body must not hold a connection and a request forever),
        # then replay it to the route.
        try:
            async with asyncio.timeout(s.body_timeout_s):
                body = await _read_body(receive, s.max_body_bytes)
        except TimeoutError:
            return await _reject(send, errors.body_timeout(s.body_timeout_s))
        except _TooLarge:
            return await _reject(send, too_big)
        if body is None:
            return  # the client left
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _read_body(receive: Receive, limit: int) -> Optional[bytes]:
    """The whole request body; None if the client disconnected; _TooLarge beyond `limit`."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        total += len(chunks[-1])
        if total > limit:
            raise _TooLarge
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _reject(send: Send, err: OpenAIError) -> None:
    resp = err.response()
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# -- factory ------------------------------------------------------------------------
def create_app(settings: Optional[Settings] = None, client: Optional[LLMClient] = None,
               health: Optional[Health] = None) -> FastAPI:
    """The adapter app. Pass `client` (and `health`) to run over a fake inference side."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        m = Metrics()
        accounts = Accounts(settings, on_refused=lambda key, reason: m.refused.labels(key, reason).inc())
        await accounts.start()
        admission = Admission(settings.max_queue_wait_s, settings.max_waiting, settings.retry_after_s)
        m.in_flight.set_function(lambda: admission.in_flight)
        m.waiting.set_function(lambda: admission.waiting)
        prober_task = None
        if client is None:
            pool = TritonPool(settings.triton_grpc_urls, settings.triton_http_urls,
                              breaker_failures=settings.breaker_failures, breaker_open_s=settings.breaker_open_s,
                              http_timeout=settings.upstream_timeout_s, retry_after=settings.retry_after_s,
                              repository_key=settings.triton_repository_key, resolve_s=settings.dns_refresh_s,
                              on_upstream_error=lambda ep, kind: m.upstream_errors.labels(ep, kind).inc(),
                              on_endpoint=lambda ep: m.circuit_open.labels(ep.grpc_url).set_function(
                                  lambda: 1.0 if ep.breaker.is_open else 0.0))
            await pool.start()
            prober = Prober(pool, settings, m)
            app.state.health = health or prober
            prober_task = asyncio.ensure_future(prober.run())
            llm: LLMClient = pool
        else:
            llm = client
            app.state.health = health or StaticHealth(client)
        # Routes live in the accounts database, shared by the replicas (none: newest version).
        router = Router(accounts.ledger.engine if accounts.ledger is not None else None,
                        settings.routes_poll_s)
        await router.start()
        app.state.deps = Deps(settings, llm, admission, m, accounts, router,
                              drain=Drain(settings.shutdown_grace_s, settings.shutdown_delay_s),
                              slots=_slots(settings, llm))
        if client is None:
            app.state.deps.on_generation_ok = prober.note_success
            app.state.deps.on_token = prober.note_token
            prober.slots_full = lambda model: admission.full(model)
            prober.version_for = lambda model, ep=None: _routed_version(router, pool, model, ep)
        log.info("settings: %s", settings.redacted())
        try:
            yield
        finally:
            if prober_task is not None:
                prober_task.cancel()
                await asyncio.gather(prober_task, return_exceptions=True)
            if client is None:
                await pool.close()
            await router.stop()
            await accounts.stop()

    # redirect_slashes off: the gate answers "/v1/models/" as "/v1/models" instead.
    app = FastAPI(title="OpenAI-compatible API over Triton", lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False)
    errors.install(app)
    openapi.install(app)
    app.include_router(v1)
    app.include_router(ops)
    app.add_middleware(Gate, state=app.state)
    app.add_middleware(RequestCounter, metrics=_LazyMetrics(app))
    return app


def _slots(settings: Settings, client: LLMClient):
    """model -> how many sequences the adapter lets it run at once: ADAPTER_MODEL_SLOTS, or
    the model's own max_num_seqs (its KV slots) times the endpoints serving it, never more
    than ADAPTER_MAX_IN_FLIGHT (also what a model gets whose config does not say)."""

    def slots(model: str) -> int:
        if settings.model_slots:
            return min(settings.model_slots, settings.max_in_flight)
        try:
            per_endpoint = int(getattr(client.model(model), "max_num_seqs", 0) or 0)
        except OpenAIError:
            per_endpoint = 0
        if not per_endpoint:
            return settings.max_in_flight
        endpoints = getattr(client, "endpoints", None)
        serving = sum(1 for ep in endpoints if ep.usable(model)) if endpoints else 1
        return min(per_endpoint * max(1, serving), settings.max_in_flight)

    return slots


def _routed_version(router: Router, pool: TritonPool, model: str, ep=None) -> str:
    """The version a request to `model` would go to now, among the versions ready on any
    usable endpoint or, given `ep`, on that one ("" when none is ready)."""
    ready = set(ep.ready_versions.get(model, ())) if ep is not None else pool.versions(model)
    try:
        return str(choose(model, router.get(model), ready, None))
    except OpenAIError:
        return ""


class _LazyMetrics:
    """The metrics object exists only once the lifespan ran; middleware is built before."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def __getattr__(self, name: str):
        return getattr(self.app.state.deps.metrics, name)
