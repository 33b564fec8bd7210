"""The Triton side: a small Protocol the serving logic depends on, and the real pool.

`TritonPool` holds one gRPC channel (and one HTTP client for health/config) per Triton
endpoint, reused by every request. A request goes to the least loaded endpoint whose
circuit is closed and on which the model is ready. Each request is one decoupled
`ModelStreamInfer` stream; closing the generator early cancels it on Triton.
"""
from __future__ import annotations

import asyncio
import codecs
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Protocol, Union

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient
from tritonclient.grpc import InferInput

from .errors import ClientGone, OpenAIError, from_model_message, unavailable

log = logging.getLogger("openai_adapter.triton")

# The header Triton's restricted model-repository API expects (stack/triton.py sets it).
REPOSITORY_KEY_HEADER = "llm-repository-key"


@dataclass
class GenerationRequest:
    """One sequence to generate (a choice): what the adapter sends to the model."""

    model: str
    prompt: Union[str, list[int]]
    max_tokens: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    ignore_eos: bool = False
    request_id: str = ""
    model_version: str = ""  # "": Triton's choice (the newest loaded version)


@dataclass
class Chunk:
    """One response of the model's stream (a text piece; counts on the last one)."""

    text: str
    finish_reason: Optional[str] = None
    num_input_tokens: Optional[int] = None
    num_output_tokens: Optional[int] = None
    model_version: str = ""


@dataclass
class ModelInfo:
    """What the adapter knows about a served model, from Triton's model-config API."""

    name: str
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    max_model_len: int = 0
    max_num_seqs: int = 0  # sequences the model decodes at once (its KV slots); 0: the config does not say


class LLMClient(Protocol):
    """What serving needs from the inference side (tests use a fake)."""

    def model(self, name: str) -> ModelInfo:
        """The model, or raise OpenAIError 404 (unknown) / 503 (not ready anywhere)."""

    def models(self) -> list[ModelInfo]:
        """Models ready on at least one endpoint."""

    def versions(self, name: str) -> set[int]:
        """The versions of a model that are ready on at least one usable endpoint."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream the model's responses; raises OpenAIError/ClientGone. Closing it cancels."""


class CircuitBreaker:
    """Closed: requests pass. Open after `failures` consecutive upstream failures (or a
    failed probe): requests fail fast. The health prober closes it again once Triton
    answers, but not before `open_s` has passed."""

    def __init__(self, failures: int, open_s: float) -> None:
        self.threshold, self.open_s = failures, open_s
        self.failures = 0
        self.opened_at: Optional[float] = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def record_failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.trip()

    def trip(self) -> None:
        if self.opened_at is None:
            self.opened_at = time.monotonic()

    def record_success(self) -> None:
        self.failures = 0

    @property
    def may_close(self) -> bool:
        """Open for at least `open_s`: a good probe may close it now."""
        return self.opened_at is not None and time.monotonic() - self.opened_at >= self.open_s

    def probe_succeeded(self) -> None:
        self.failures = 0
        if self.may_close:
            self.opened_at = None


_GRPC_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    # Reconnect quickly once Triton is back (the default backoff grows to minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# gRPC statuses that say "this endpoint is not serving" (count against its circuit).
_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
         grpc.StatusCode.DEADLINE_EXCEEDED}


class Endpoint:
    """One Triton server: its channels, circuit, load and what it serves."""

    def __init__(self, grpc_url: str, http_url: str, breaker: CircuitBreaker, http_timeout: float,
                 repository_key: str = "") -> None:
        self.grpc_url, self.http_url = grpc_url, http_url
        self.admin_headers = {REPOSITORY_KEY_HEADER: repository_key} if repository_key else None
        self.breaker = breaker
        self.in_flight = 0
        self.models: dict[str, ModelInfo] = {}
        self.ready: set[str] = set()
        self.ready_versions: dict[str, frozenset[int]] = {}
        # Models whose backend process died here: refused until reloaded; their streams end.
        self.broken: dict[str, float] = {}
        self.aborts: dict[str, asyncio.Event] = {}
        self.recovery: Optional[asyncio.Task] = None
        self.versions: dict[str, str] = {}  # model -> versions seen, to re-read a reloaded config
        # (model, version) -> streams open here, and when the last of them heard anything:
        # a silence while streams are open is how a dead backend process shows (Triton
        # tells nobody). By version: each version has its own backend process.
        self.streams: dict[tuple[str, str], int] = {}
        self.last_heard: dict[tuple[str, str], float] = {}
        self.reachable = False
        self.grpc = grpcclient.InferenceServerClient(grpc_url, channel_args=_GRPC_CHANNEL_ARGS)
        host = http_url.split("://", 1)[-1].rstrip("/")
        self.http = httpclient.InferenceServerClient(host, conn_timeout=http_timeout,
                                                     ssl=http_url.startswith("https://"))

    def usable(self, model: str, version: str = "") -> bool:
        if self.breaker.is_open or model not in self.ready or model in self.broken:
            return False
        return not version or int(version) in self.ready_versions.get(model, ())

    async def refresh(self) -> None:
        """Learn the models and their readiness; raises when Triton does not answer."""
        if not await self.http.is_server_live():
            raise ConnectionError("not live")
        index = await self.http.get_model_repository_index(headers=self.admin_headers)
        ready: set[str] = set()
        versions: dict[str, list[str]] = {}
        for entry in index:
            if entry.get("state") == "READY":
                versions.setdefault(entry.get("name", ""), []).append(str(entry.get("version", "")))
        for name, vs in versions.items():
            if not await self.http.is_model_ready(name):
                continue
            seen = ",".join(sorted(vs))
            if name not in self.models or self.versions.get(name) != seen:
                info = _model_info(name, await self.http.get_model_config(name))
                if info is None:
                    continue  # not a text-generation model
                self.models[name] = info
                self.versions[name] = seen
            ready.add(name)
        self.ready_versions = {name: frozenset(int(v) for v in vs if v.isdigit()) for name, vs in versions.items()}
        self.ready = ready
        self.reachable = True

    def abort_event(self, model: str) -> asyncio.Event:
        return self.aborts.setdefault(model, asyncio.Event())

    async def reload(self, model: str, timeout: float) -> None:
        """Unload and load the model through Triton's repository API: a new backend
        process. The old instance may never finish unloading (Triton keeps the requests
        of a dead process), so the load does not wait for it."""
        await self.http.unload_model(model, headers=self.admin_headers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {e.get("state") for e in await self.http.get_model_repository_index(headers=self.admin_headers)
                      if e.get("name") == model}
            if "READY" not in states:
                break
            await asyncio.sleep(0.1)
        await self.http.load_model(model, headers=self.admin_headers)

    async def close(self) -> None:
        if self.recovery is not None:
            self.recovery.cancel()
            await asyncio.gather(self.recovery, return_exceptions=True)
        await self.grpc.close()
        await self.http.close()


def _model_info(name: str, config: dict) -> Optional[ModelInfo]:
    if not any(i.get("name") == "text_input" for i in config.get("input", [])):
        return None
    params = {k: (v.get("string_value", "") if isinstance(v, dict) else str(v))
              for k, v in (config.get("parameters") or {}).items()}
    def number(key: str) -> int:
        try:
            return int(params.get(key) or 0)
        except ValueError:
            return 0

    instances = sum(int(g.get("count", 1) or 1) for g in config.get("instance_group") or []) or 1
    return ModelInfo(name, params.get("chat_template", ""), params.get("bos_token", ""),
                     params.get("eos_token", ""), number("max_model_len"), number("max_num_seqs") * instances)


def _tensor(name: str, dtype: str, arr: np.ndarray) -> InferInput:
    t = InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def build_inputs(req: GenerationRequest) -> list[InferInput]:
    """The model's input tensors (leading batch dimension of 1)."""
    if isinstance(req.prompt, str):
        inputs = [_tensor("text_input", "BYTES", np.array([[req.prompt.encode()]], dtype=object))]
    else:
        inputs = [_tensor("input_ids", "INT64", np.array([req.prompt], dtype=np.int64))]
    scalars = [("max_tokens", "INT32", np.int32, req.max_tokens),
               ("temperature", "FP32", np.float32, req.temperature),
               ("top_p", "FP32", np.float32, req.top_p),
               ("top_k", "INT32", np.int32, req.top_k),
               ("seed", "UINT64", np.uint64, None if req.seed is None else req.seed % 2**64),
               ("presence_penalty", "FP32", np.float32, req.presence_penalty),
               ("frequency_penalty", "FP32", np.float32, req.frequency_penalty)]
    for name, dtype, np_type, value in scalars:
        if value is not None:
            inputs.append(_tensor(name, dtype, np.array([[value]], dtype=np_type)))
    for name, value in (("stream", True), ("exclude_input_in_output", True), ("return_num_input_tokens", True),
                        ("return_num_output_tokens", True), ("ignore_eos", req.ignore_eos)):
        inputs.append(_tensor(name, "BOOL", np.array([[value]], dtype=bool)))
    if req.stop:
        inputs.append(_tensor("stop_words", "BYTES", np.array([[s.encode() for s in req.stop]], dtype=object)))
    return inputs


def parse_chunk(result, decoder: Optional[codecs.IncrementalDecoder] = None) -> Optional[Chunk]:
    """A Chunk from one InferResult; None for the empty final response. `decoder` (one per
    stream) keeps a UTF-8 character split across responses whole."""
    text = result.as_numpy("text_output")
    finish = result.as_numpy("finish_reason")
    if text is None and finish is None:
        return None
    decoder = decoder or codecs.getincrementaldecoder("utf-8")("replace")
    pieces = [] if text is None else [decoder.decode(t) if isinstance(t, bytes) else str(t)
                                      for t in text.reshape(-1)]
    reason = None
    if finish is not None and finish.size:
        f = finish.reshape(-1)[0]
        reason = (f.decode() if isinstance(f, bytes) else str(f)) or None

    def count(name: str) -> Optional[int]:
        v = result.as_numpy(name)
        return int(v.reshape(-1)[0]) if v is not None and v.size else None

    try:
        version = result.get_response().model_version
    except AttributeError:
        version = ""
    return Chunk("".join(pieces), reason, count("num_input_tokens"), count("num_output_tokens"), version)


# What Triton's Python backend answers once a model instance's stub process is gone.
BACKEND_DEAD = "is not healthy"


async def _cancel_when(event: asyncio.Event, stream) -> None:
    await event.wait()
    stream.cancel()


class UpstreamDown(Exception):
    """The endpoint did not answer (connection-level); another one may."""


DNS = "dns:"


def _split_dns(spec: str) -> tuple[str, int]:
    host, _, port = spec[len(DNS):].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{spec!r}: write dns:HOST:PORT")
    return host, int(port)


def resolve_specs(specs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(gRPC, HTTP) address pairs: `dns:HOST:PORT` entries become one pair per address
    HOST resolves to (a headless Service: one per Triton pod); others stay as they are."""
    out = []
    for g, h in specs:
        if not g.startswith(DNS):
            out.append((g, h))
            continue
        host, gport = _split_dns(g)
        _, hport = _split_dns(h) if h.startswith(DNS) else (host, gport - 1)
        scheme = "https" if h.startswith("https://") else "http"
        for addr in sorted({i[4][0] for i in socket.getaddrinfo(host, gport, type=socket.SOCK_STREAM)}):
            a = f"[{addr}]" if ":" in addr else addr
            out.append((f"{a}:{gport}", f"{scheme}://{a}:{hport}"))
    return out


class TritonPool:
    """LLMClient over one or more Triton endpoints. A `dns:HOST:PORT` endpoint is every
    address of HOST, looked up again every `resolve_s`: pods that come are used, pods that
    go are dropped (their running streams finish)."""

    def __init__(self, grpc_urls: list[str], http_urls: list[str], *, breaker_failures: int = 3,
                 breaker_open_s: float = 1.0, http_timeout: float = 5.0, retry_after: int = 1,
                 on_upstream_error=None, repository_key: str = "", resolve_s: float = 5.0,
                 on_endpoint=None) -> None:
        self._specs = list(zip(grpc_urls, http_urls))
        self._make = lambda g, h: Endpoint(g, h, CircuitBreaker(breaker_failures, breaker_open_s), http_timeout,
                                           repository_key)
        self._on_endpoint = on_endpoint or (lambda ep: None)
        self.resolve_s = resolve_s
        self.endpoints: list[Endpoint] = []
        self._dropped: list[Endpoint] = []
        self._task: Optional[asyncio.Task] = None
        self.retry_after = retry_after
        self._rr = itertools.count()
        self._on_error = on_upstream_error or (lambda endpoint, kind: None)
        try:
            self._reconcile(resolve_specs(self._specs))
        except OSError as err:  # the Service may not resolve yet; the resolver tries again
            log.warning("resolving the Triton endpoints failed: %s", err)

    def _reconcile(self, pairs: list[tuple[str, str]]) -> None:
        current = {ep.grpc_url: ep for ep in self.endpoints}
        wanted = [g for g, _ in pairs]
        for g, h in pairs:
            if g not in current:
                current[g] = self._make(g, h)
                self._on_endpoint(current[g])
                log.info("Triton endpoint %s added", g)
        for g, ep in current.items():
            if g not in wanted:
                log.info("Triton endpoint %s gone", g)
                self._dropped.append(ep)
        self.endpoints = [current[g] for g in wanted]

    async def start(self) -> None:
        if any(g.startswith(DNS) for g, _ in self._specs):
            self._task = asyncio.ensure_future(self._resolve_loop())

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_s)
            try:
                self._reconcile(await asyncio.to_thread(resolve_specs, self._specs))
            except OSError as err:
                log.warning("resolving the Triton endpoints failed (keeping %d): %s", len(self.endpoints), err)
            for ep in [e for e in self._dropped if e.in_flight == 0]:
                self._dropped.remove(ep)
                await ep.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for ep in self.endpoints + self._dropped:
            await ep.close()

    # -- catalog -----------------------------------------------------------------
    def _all_models(self) -> dict[str, ModelInfo]:
        out: dict[str, ModelInfo] = {}
        for ep in self.endpoints:
            out.update(ep.models)
        return out

    def models(self) -> list[ModelInfo]:
        known = self._all_models()
        ready = {m for ep in self.endpoints if not ep.breaker.is_open for m in ep.ready if m not in ep.broken}
        return [known[m] for m in sorted(ready) if m in known]

    def versions(self, name: str) -> set[int]:
        return {v for ep in self.endpoints if ep.usable(name) for v in ep.ready_versions.get(name, ())}

    def model(self, name: str) -> ModelInfo:
        known = self._all_models()
        if name not in known:
            if not any(ep.reachable for ep in self.endpoints):
                raise unavailable("the inference server is not reachable", self.retry_after)
            raise OpenAIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        if not any(ep.usable(name) for ep in self.endpoints):
            raise unavailable(f"the model {name!r} is not ready", self.retry_after, code="model_not_ready")
        return known[name]

    def pick(self, model: str, exclude: set[int] = frozenset(), version: str = "") -> Optional[Endpoint]:
        """The least loaded usable endpoint that has the version ready (ties in turn)."""
        candidates = [ep for i, ep in enumerate(self.endpoints) if ep.usable(model, version) and i not in exclude]
        if not candidates:
            return None
        low = min(ep.in_flight for ep in candidates)
        best = [ep for ep in candidates if ep.in_flight == low]
        return best[next(self._rr) % len(best)]

    # -- a backend process that died ----------------------------------------------
    def _restarting(self, model: str) -> OpenAIError:
        return unavailable(f"the model {model!r} stopped (its backend process died) and is being loaded again",
                           self.retry_after, code="model_restarting")

    def backend_died(self, ep: Endpoint, model: str) -> None:
        """Triton says the model's backend process is gone: refuse new requests here, end
        the streams it will never answer, and load the model again in the background."""
        if model in ep.broken:
            return
        log.error("Triton %s: the backend process of %s died; ending its streams and loading it again",
                  ep.http_url, model)
        ep.broken[model] = time.monotonic()
        ep.abort_event(model).set()
        self._on_error(ep.grpc_url, "backend_died")
        ep.recovery = asyncio.ensure_future(self._recover(ep, model))

    async def _recover(self, ep: Endpoint, model: str) -> None:
        pause = 1.0
        while True:
            try:
                await ep.reload(model, timeout=5.0)
                await ep.refresh()
                if model in ep.ready:
                    break
            except Exception as err:  # Triton busy or away: try again
                log.warning("reloading %s on %s failed (%s: %s); again in %g s", model, ep.http_url,
                            type(err).__name__, err, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 15.0)
        ep.broken.pop(model, None)
        ep.aborts.pop(model, None)  # streams from now on watch a fresh event
        log.info("Triton %s: %s loaded again after its backend process died", ep.http_url, model)

    # -- generation --------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        tried: set[int] = set()
        while True:
            ep = self.pick(request.model, tried, request.model_version)
            if ep is None:
                raise unavailable(f"the model {request.model!r} is not ready on any inference server",
                                  self.retry_after, code="model_not_ready")
            tried.add(self.endpoints.index(ep))
            started = False
            try:
                async for chunk in self._stream(ep, request):
                    started = True
                    yield chunk
                return
            except UpstreamDown:
                if started or len(tried) == len(self.endpoints):
                    raise unavailable("the inference server is not reachable", self.retry_after) from None
                # nothing was sent yet: try the next endpoint

    async def _stream(self, ep: Endpoint, request: GenerationRequest) -> AsyncIterator[Chunk]:
        done = asyncio.Event()
        # Built here, not in the iterator: an exception there reaches us only as the
        # call's CancelledError, which no error handler turns into an answer.
        inputs = build_inputs(request)

        async def requests():
            yield {"model_name": request.model, "model_version": request.model_version, "inputs": inputs,
                   "request_id": request.request_id, "parameters": {"triton_enable_empty_final_response": True}}
            await done.wait()  # keep our half open until the final response came

        key = (request.model, request.model_version)
        ep.in_flight += 1
        if not ep.streams.get(key):
            ep.last_heard[key] = time.monotonic()
        ep.streams[key] = ep.streams.get(key, 0) + 1
        finished = False
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        stream = watcher = None
        aborted = ep.abort_event(request.model)
        try:
            stream = ep.grpc.stream_infer(inputs_iterator=requests())
            # A dead backend process never answers its streams: when one is found dead, this
            # watcher cancels ours, so the client gets an error instead of waiting forever.
            watcher = asyncio.ensure_future(_cancel_when(aborted, stream))
            while True:
                try:
                    result, error = await stream.__anext__()
                    ep.last_heard[key] = time.monotonic()
                except asyncio.CancelledError:
                    if aborted.is_set():
                        finished = True
                        raise self._restarting(request.model) from None
                    raise
                except StopAsyncIteration:
                    finished = True
                    raise UpstreamDown("stream ended without the final response") from None
                except grpc.aio.AioRpcError as err:
                    finished = True
                    if aborted.is_set():
                        raise self._restarting(request.model) from None
                    mapped = from_model_message(str(err.details() or ""), self.retry_after)
                    if isinstance(mapped, OpenAIError) and mapped.status == 429:
                        raise mapped from None  # queue full: busy, not down
                    self._on_error(ep.grpc_url, err.code().name.lower())
                    if err.code() in _DOWN:
                        ep.breaker.record_failure()
                        raise UpstreamDown(str(err.details())) from None
                    raise mapped from None
                if error is not None:
                    finished = True
                    if BACKEND_DEAD in error.message():
                        self.backend_died(ep, request.model)
                        raise self._restarting(request.model) from None
                    mapped = from_model_message(error.message(), self.retry_after)
                    if isinstance(mapped, OpenAIError) and mapped.code == "model_not_ready":
                        ep.ready.discard(request.model)
                    if not isinstance(mapped, ClientGone) and mapped.status >= 500:
                        self._on_error(ep.grpc_url, "model_error")
                    raise mapped
                ep.breaker.record_success()
                final = result.get_response().parameters["triton_final_response"].bool_param \
                    if "triton_final_response" in result.get_response().parameters else False
                chunk = parse_chunk(result, decoder)
                if final:
                    tail = decoder.decode(b"", final=True)
                    if tail:
                        chunk = chunk or Chunk("")
                        chunk.text += tail
                if chunk is not None:
                    yield chunk
                if final:
                    finished = True
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            done.set()
            ep.in_flight -= 1
            ep.streams[key] -= 1
            if not finished and stream is not None:
                stream.cancel()  # client gone, deadline, or stop found here: free the model's slot
