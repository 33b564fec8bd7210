"""Which version of a model a request goes to.

`llm-deploy` records, per model name, the version that takes traffic (and the previous
one, and a canary with its share) in the shared database's `model_routes` table; every
adapter replica reads the table about once a second, so a switch reaches all of them
within 2 s without a restart. Each request is addressed to one version explicitly, so
a stream that started on the old version finishes on it.

    no route         the newest ready version (what Triton itself would pick)
    a route          the serving version; with a canary, P% of new requests go to it
    NAME@N           the client pins version N (it must be loaded), for tests and A/B
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Callable, Optional

import sqlalchemy as sa

from .errors import OpenAIError, unavailable

log = logging.getLogger("openai_adapter.routing")

PIN = "@"


@dataclass(frozen=True)
class Route:
    serving: int
    previous: Optional[int] = None
    canary: Optional[int] = None
    canary_percent: int = 0


def split_pin(requested: str) -> tuple[str, Optional[int]]:
    """'name@2' -> ('name', 2); 'name' -> ('name', None). A bad pin is a 400."""
    name, sep, version = requested.rpartition(PIN)
    if not sep:
        return requested, None
    if not version.isdigit() or not name:
        raise OpenAIError(400, f"model {requested!r}: a version pin is NAME@N with N a version number",
                          param="model", code="invalid_model_version")
    return name, int(version)


def choose(model: str, route: Optional[Route], ready: set[int], pinned: Optional[int],
           retry_after: int = 1, draw: Callable[[], float] = random.random) -> int:
    """The version for one request, given the versions ready on the servers."""
    if pinned is not None:
        if pinned not in ready:
            raise OpenAIError(404, f"version {pinned} of the model {model!r} is not loaded "
                                   f"(loaded: {', '.join(map(str, sorted(ready))) or 'none'})",
                              param="model", code="model_not_found")
        return pinned
    if not ready:
        raise unavailable(f"the model {model!r} is not ready", retry_after, code="model_not_ready")
    if route is None:
        return max(ready)
    if route.canary is not None and route.canary in ready and draw() * 100 < route.canary_percent:
        return route.canary
    if route.serving in ready:
        return route.serving
    # Never fall forward to an unvalidated version: back to the previous one, or 503.
    if route.previous is not None and route.previous in ready:
        log.warning("model %s: serving version %s is not ready; answering from version %s",
                    model, route.serving, route.previous)
        return route.previous
    raise unavailable(f"version {route.serving} of the model {model!r}, which takes its traffic, is not ready",
                      retry_after, code="model_not_ready")


class Router:
    """The routes of every model, refreshed from the database in the background."""

    def __init__(self, engine: Optional[sa.Engine], poll_s: float = 1.0) -> None:
        self.engine, self.poll_s = engine, poll_s
        self.routes: dict[str, Route] = {}
        self._task: Optional[asyncio.Task] = None

    def get(self, model: str) -> Optional[Route]:
        return self.routes.get(model)

    def load(self) -> dict[str, Route]:
        from .accounts.schema import model_routes
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(model_routes)).all()
        return {r.model: Route(r.serving_version, r.previous_version, r.canary_version, r.canary_percent)
                for r in rows}

    async def start(self) -> None:
        if self.engine is None:
            return
        self.routes = await asyncio.to_thread(self.load)
        self._task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                routes = await asyncio.to_thread(self.load)
            except Exception:  # keep the last known routes while the database is away
                log.exception("reading model routes failed")
                continue
            for model, route in routes.items():
                if self.routes.get(model) != route:
                    log.info("model %s: route now %s", model, route)
            self.routes = routes
