"""Readiness that proves the model works: per-model readiness on Triton plus a small
real generation that succeeded recently, refreshed by a background prober."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

from .errors import ClientGone, OpenAIError
from .metrics import Metrics
from .settings import Settings
from .triton_client import GenerationRequest, TritonPool, UpstreamDown

log = logging.getLogger("openai_adapter.health")

SILENCE_PROBE_TIMEOUT_S = 2.0  # see Prober._silence_probe


def probe_request(model: str, version: str, request_id: str) -> GenerationRequest:
    """A one-token greedy generation: what every probe sends."""
    return GenerationRequest(model=model, prompt="Hello", max_tokens=1, temperature=0.0,
                             request_id=request_id, model_version=version)


class Health(Protocol):
    def status(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details for the body)."""


class StaticHealth:
    """For an injected client (tests): ready when the client lists a model."""

    def __init__(self, client) -> None:
        self.client = client

    def status(self) -> tuple[bool, dict[str, Any]]:
        models = [m.name for m in self.client.models()]
        return bool(models), {"models": {m: "ready" for m in models}}


class Prober:
    """Every `health_interval_s`: refresh each endpoint's models and readiness over HTTP
    (tripping or closing its circuit), then run a one-token generation per ready model."""

    def __init__(self, pool: TritonPool, settings: Settings, metrics: Metrics) -> None:
        self.pool, self.settings, self.metrics = pool, settings, metrics
        # Set by the app: the version a request to the model goes to now (on that endpoint).
        self.version_for: Callable[..., str] = lambda model, ep=None: ""
        # Set by the app: every slot of the model is taken, so a probe would wait in the
        # model's queue (and, sent just before its backend process dies, never come back).
        self.slots_full: Callable[[str], bool] = lambda model: False
        self.last_ok: dict[str, float] = {}  # model -> monotonic time of the last good generation
        self.last_token: dict[str, float] = {}  # model -> monotonic time of the last token streamed
        self.last_error: dict[str, str] = {}
        # (endpoint, model, version) -> the silence probe out now / when the last one ended
        self._silence_probes: dict[tuple[str, str, str], asyncio.Task] = {}
        self._silence_probed: dict[tuple[str, str, str], float] = {}

    def note_success(self, model: str) -> None:
        """A request finished normally: as good a proof as a probe."""
        self.last_ok[model] = time.monotonic()

    def note_token(self, model: str) -> None:
        """A token was streamed: the model works (it proves readiness; it replaces a probe
        only while every slot is taken, see `_generate`)."""
        self.last_token[model] = time.monotonic()

    def _proved(self, model: str) -> float:
        return max(self.last_ok.get(model, -1e9), self.last_token.get(model, -1e9))

    def status(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        models: dict[str, str] = {}
        for m in self.pool.models():
            age = now - self._proved(m.name)
            if age <= self.settings.health_max_age_s or not self.settings.health_probe_generation:
                models[m.name] = "ready"
            else:
                models[m.name] = "no successful generation in the last " \
                                 f"{self.settings.health_max_age_s:g} s ({self.last_error.get(m.name, 'not probed yet')})"
        endpoints = {ep.grpc_url: ("open" if ep.breaker.is_open else "closed") for ep in self.pool.endpoints}
        working = [v == "ready" for v in models.values()]
        ready = bool(models) and (any(working) if self.settings.ready_when == "any" else all(working))
        return ready, {"models": models, "circuits": endpoints}

    async def run(self) -> None:
        watch = self.settings.health_probe_generation and self.settings.silence_probe_s > 0
        watcher = asyncio.ensure_future(self._watch_silence()) if watch else None
        try:
            while True:
                try:
                    await self.probe_once()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the prober must never die
                    log.exception("health probe failed")
                fast = any(ep.breaker.is_open or not ep.reachable for ep in self.pool.endpoints)
                await asyncio.sleep(min(self.settings.health_interval_s, 0.25) if fast
                                    else self.settings.health_interval_s)
        finally:
            tasks = ([watcher] if watcher else []) + list(self._silence_probes.values())
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_silence(self) -> None:
        """Streams are open on an endpoint and it has said nothing for `silence_probe_s`:
        send it a probe now, not at the next tick. Triton tells nobody that a model's
        backend process died (its streams just stop), but it answers a new request for the
        model "not healthy" within about a second, and that answer ends the streams
        (`TritonPool.backend_died`). One probe at a time per endpoint, model and version,
        at most one a second: a long prefill is silence too, and costs only that probe."""
        silence = self.settings.silence_probe_s
        while True:
            await asyncio.sleep(min(0.1, silence / 3))
            try:
                self._look_for_silence(time.monotonic(), silence)
            except Exception:  # the watch must never die
                log.exception("looking for silent endpoints failed")

    def _look_for_silence(self, now: float, silence: float) -> None:
        urls = {ep.grpc_url for ep in self.pool.endpoints}
        for key in [k for k in self._silence_probed if k[0] not in urls]:
            del self._silence_probed[key]  # an endpoint gone (DNS)
        for ep in list(self.pool.endpoints):
            if ep.breaker.is_open:
                continue  # known down; the prober takes it from here
            for (model, version), n in list(ep.streams.items()):
                key = (ep.grpc_url, model, version)
                if (n and model not in ep.broken and now - ep.last_heard.get((model, version), now) >= silence
                        and key not in self._silence_probes and now - self._silence_probed.get(key, -1e9) >= 1.0):
                    self._silence_probes[key] = asyncio.ensure_future(self._silence_probe(ep, model, version, key))

    async def _silence_probe(self, ep, model: str, version: str, key: tuple[str, str, str]) -> None:
        retry_now = False
        try:
            req = probe_request(model, version or self.version_for(model, ep), "silence-probe")
            # A live backend answers at once unless every slot is taken; a dead one answers
            # "not healthy" within about a second, or never, when the probe reached it just
            # before it died. So a probe unanswered for this long is dropped, and the next
            # one goes at once.
            async with asyncio.timeout(SILENCE_PROBE_TIMEOUT_S):
                async for _ in self.pool._stream(ep, req):
                    pass
        except TimeoutError:
            retry_now = True
        except Exception as err:  # a dead backend process was handled inside _stream
            log.debug("silence probe of %s on %s: %s: %s", model, ep.grpc_url, type(err).__name__, err)
        finally:
            self._silence_probes.pop(key, None)
            self._silence_probed[key] = -1e9 if retry_now else time.monotonic()

    async def probe_once(self) -> None:
        await asyncio.gather(*(self._probe_endpoint(i) for i in range(len(self.pool.endpoints))))

    async def _probe_endpoint(self, i: int) -> None:
        ep = self.pool.endpoints[i]
        try:
            await asyncio.wait_for(ep.refresh(), self.settings.upstream_timeout_s)
        except Exception as err:
            if not ep.breaker.is_open:
                log.warning("Triton %s does not answer (%s): circuit open", ep.http_url, type(err).__name__)
            ep.breaker.trip()
            self.metrics.circuit_open.labels(ep.grpc_url).set(1)
            return
        was_open = ep.breaker.is_open
        if ep.breaker.may_close and self.settings.health_probe_generation:
            # Close it only once the endpoint generates: a restarted Triton answers HTTP while
            # our gRPC channel may still wait out its reconnect backoff, and requests sent
            # there meanwhile would all fail over to the other endpoints.
            # Any model that would take traffic there will do (not one being reloaded).
            candidates = [m for m in sorted(ep.ready) if m not in ep.broken and self.version_for(m, ep)]
            if candidates and not await self._generates_any(ep, candidates):
                return
        ep.breaker.probe_succeeded()
        if was_open and not ep.breaker.is_open:
            log.info("Triton %s answers again: circuit closed", ep.http_url)
        self.metrics.circuit_open.labels(ep.grpc_url).set(1 if ep.breaker.is_open else 0)
        if not self.settings.health_probe_generation or ep.breaker.is_open:
            return
        for model in sorted(ep.ready):
            await self._generate(ep, model)

    async def _generates_any(self, ep, models: list[str]) -> bool:
        for model in models:
            if await self._generate(ep, model, force=True):
                return True
        return False

    async def _generate(self, ep, model: str, force: bool = False) -> bool:
        """One-token generation on `ep` (skipped, unless forced, while traffic proves the
        model); whether it worked."""
        now, interval = time.monotonic(), self.settings.health_interval_s
        if not force and now - self.last_ok.get(model, -1e9) < interval:
            return True  # traffic just proved it
        if not force and self.slots_full(model) and now - self.last_token.get(model, -1e9) < interval:
            # Streams flow in every slot: a probe would only queue behind them, and one queued
            # when the backend process dies blocks the prober for health_max_age_s (the
            # death went unseen for 10 s at 16 streams). Once the tokens stop, probe again.
            return True
        # The version that takes traffic, not a candidate llm-deploy is still validating.
        req = probe_request(model, self.version_for(model, ep), "health-probe")
        ok = False
        try:
            async with asyncio.timeout(self.settings.health_max_age_s):
                async for _ in self.pool._stream(ep, req):
                    pass
            ok = True
        except OpenAIError as err:
            ok = err.status == 429  # busy is alive
            self.last_error[model] = err.message
        except UpstreamDown as err:
            ep.breaker.trip()  # HTTP answers but gRPC does not: keep requests away
            self.last_error[model] = f"gRPC endpoint down: {err}"[:200]
        except (ClientGone, TimeoutError, Exception) as err:
            self.last_error[model] = f"{type(err).__name__}: {err}"[:200]
        if ok:
            self.last_ok[model] = time.monotonic()
        if ok or not force:  # one endpoint not back yet says nothing of the model elsewhere
            self.metrics.model_ready.labels(model).set(1 if ok else 0)
        return ok
