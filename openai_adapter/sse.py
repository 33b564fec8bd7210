"""Server-sent events: `data: <json>\n\n` framing and a response that cancels on disconnect."""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import Any, AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("openai_adapter.sse")

DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class SSEResponse(Response):
    """Streams `body` as text/event-stream. The body is closed (which cancels the
    Triton request) as soon as the client disconnects, and `on_close` runs exactly once
    whatever happens."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Any],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.events = body
        self.on_close = on_close
        self.extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *self.extra,
            ]})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (pump_task, watch_task):
                t.cancel()
            results = await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            try:
                await self.events.aclose()
            finally:
                done = self.on_close()
                if inspect.isawaitable(done):
                    await done
        err = results[0]
        if isinstance(err, Exception) and not isinstance(err, OSError):
            log.error("stream failed: %r", err)
