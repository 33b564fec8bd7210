"""What the adapter calls: authenticate a request, admit it against its key's limits,
settle it at its end. Database work runs in a small thread pool so the event loop
never waits on it; a background task beats the instance's heartbeat and recovers
the reservations of adapter processes that died."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from ..errors import OpenAIError
from ..settings import Settings
from .ledger import Admitted, AuthError, Ledger, LimitExceeded, Principal, Usage
from .limits import Reserve
from .store import check_schema, make_engine, migrate

log = logging.getLogger("openai_adapter.accounts")

ANONYMOUS = Principal(None, "anonymous")
KEYS_CHECK_S = 1.0  # how stale "does any key exist" may be (a new key locks the API within this)
PRINCIPAL_TTL_S = 1.0  # how long an authenticated key is trusted without asking the database


def auth_error(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key")


class Accounts:
    def __init__(self, settings: Settings, on_refused: Callable[[str, str], None] = lambda key, reason: None) -> None:
        self.settings = settings
        self.static_keys = [k.encode() for k in settings.api_keys]
        self.metrics_token = settings.metrics_token.encode()
        self.ledger: Optional[Ledger] = None
        if settings.database_url:
            self.ledger = Ledger(make_engine(settings.database_url))
        self.on_refused = on_refused
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="accounts")
        self._any_key = False
        self._any_key_at = -1e9
        self._task: Optional[asyncio.Task] = None
        self._settling: set[asyncio.Task] = set()
        self._principals: dict[str, tuple[Principal, float]] = {}

    async def _run(self, fn, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- life cycle ---------------------------------------------------------------
    async def start(self) -> None:
        if self.ledger is None:
            log.warning("ADAPTER_DATABASE_URL is empty: no usage ledger, no per-key limits (static keys only)")
        else:
            engine = self.ledger.engine
            if self.settings.db_migrate:
                before, after = await self._run(migrate, engine)
                if before != after:
                    log.info("accounts database migrated from %s to %s", before or "empty", after)
            else:
                await self._run(check_schema, engine)
            await self._run(self.ledger.heartbeat)
            recovered = await self._run(self.ledger.recover, int(self.settings.instance_stale_s * 1000))
            if recovered:
                log.warning("settled %d reservations left open by a stopped adapter (charged as reserved)", recovered)
            self._task = asyncio.ensure_future(self._beat())
        if not await self.keys_required():
            log.warning("no API key is configured: the API is open to anyone who can reach it (for local use); "
                        "create one with `llm-admin keys create` or set ADAPTER_API_KEYS")

    async def stop(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.ledger is not None:
            await self._run(self.ledger.leave)
            self.ledger.engine.dispose()
        self._pool.shutdown(wait=True)

    async def _beat(self) -> None:
        stale_ms = int(self.settings.instance_stale_s * 1000)
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self._run(self.ledger.heartbeat)
                n = await self._run(self.ledger.recover, stale_ms)
                if n:
                    log.warning("settled %d reservations of a stopped adapter (charged as reserved)", n)
            except Exception:  # the database may be away for a moment; try again next beat
                log.exception("accounts heartbeat failed")

    # -- who is calling -----------------------------------------------------------
    async def keys_required(self) -> bool:
        if self.static_keys:
            return True
        if self.ledger is None or self._any_key:
            return self._any_key  # once a key exists it is never "no keys" again
        now = time.monotonic()
        if now - self._any_key_at > KEYS_CHECK_S:
            self._any_key_at = now
            self._any_key = await self._run(self.ledger.any_key)
        return self._any_key

    async def authenticate(self, path: str, authorization: str) -> Principal:
        """The caller of a non-health route, or OpenAIError 401."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if path == "/metrics" and self.metrics_token:
            # Prometheus has a token of its own, so it needs no API key (and no key can scrape).
            if hmac.compare_digest(token.encode(), self.metrics_token):
                return ANONYMOUS
            raise auth_error("missing or invalid metrics token (send Authorization: Bearer TOKEN)")
        if not await self.keys_required():
            return ANONYMOUS
        if not token:
            if authorization and scheme.lower() != "bearer":
                raise auth_error(f"unsupported authorization scheme {scheme[:20]!r}: send Authorization: Bearer KEY")
            raise auth_error("missing API key: send Authorization: Bearer KEY")
        token_b = token.encode("utf-8", "surrogatepass")
        matched = -1
        for i, key in enumerate(self.static_keys):  # no early exit: the time does not tell which matched
            if hmac.compare_digest(token_b, key):
                matched = i
        if matched >= 0:
            return Principal(None, f"static-key-{matched + 1}")
        if self.ledger is None:
            raise auth_error("invalid API key")
        now = time.monotonic()
        cached = self._principals.get(token)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            who = await self._run(self.ledger.authenticate, token)
        except AuthError as err:
            raise auth_error(str(err)) from None
        if len(self._principals) > 10_000:
            self._principals.clear()
        # Kept 1 s: a revoked key is refused here within that, and at once by admission,
        # which reads the key's row in its own transaction.
        self._principals[token] = (who, now + PRINCIPAL_TTL_S)
        return who

    # -- a request's accounting ---------------------------------------------------
    async def admit(self, who: Principal, request_id: str, model: str, reserve: Reserve) -> Admitted:
        if self.ledger is None:
            return Admitted(request_id, {})
        try:
            return await self._run(self.ledger.admit, who, request_id, model, reserve)
        except LimitExceeded as err:
            self.on_refused(who.label, err.kind)
            raise _limit_error(err) from None
        except AuthError as err:
            raise auth_error(str(err)) from None

    async def release(self, request_id: str) -> None:
        if self.ledger is not None:
            await self._shielded(self.ledger.release, request_id)

    async def settle(self, request_id: str, usage: Usage) -> None:
        if self.ledger is not None:
            await self._shielded(self.ledger.settle, request_id, usage)

    async def _shielded(self, fn, *args: Any) -> None:
        """Run to the end even if the request's task is cancelled (client gone, shutdown):
        otherwise the reservation stays open until recovery charges it as reserved."""
        task = asyncio.ensure_future(self._run(fn, *args))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("accounting of %s failed; recovery will settle it", args[0])


def _limit_error(err: LimitExceeded) -> OpenAIError:
    headers = dict(err.headers)
    if err.code == "insufficient_quota":
        # The official SDKs retry 429s unless told not to: a spent budget will not come back.
        headers["x-should-retry"] = "false"
        return OpenAIError(429, err.message, type="insufficient_quota", code="insufficient_quota", headers=headers)
    return OpenAIError(429, err.message, type="tokens" if err.kind == "tokens" else "requests",
                       code="rate_limit_exceeded", retry_after=err.retry_after_s,
                       headers=headers)
