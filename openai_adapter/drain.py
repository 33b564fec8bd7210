"""Shutdown without cutting anyone off.

On SIGTERM (or the first Ctrl-C): readiness fails at once; for `delay_s` the adapter
keeps serving normally (load balancers notice the failed readiness and stop sending);
then new requests get 503 `shutting_down` with Retry-After while the listener stays open
and in-flight requests run on. The server shuts down as soon as none is left, or at the
end of the grace period (counted from the signal). `margin_s` before that end, requests
still running are ended the way clients understand: a stream with an error event and
`data: [DONE]`, a request that has not answered yet with 503. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional


def margin_s(grace_s: float) -> float:
    """How long before the grace period's end the requests still running are ended: time
    to send their error events and settle them in the accounts."""
    return min(2.0, max(0.0, grace_s) / 4)


class Drain:
    def __init__(self, grace_s: float, delay_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s, self.delay_s, self.clock = grace_s, delay_s, clock
        self.margin_s = margin_s(grace_s)
        self.signalled_at: Optional[float] = None
        self.active = 0          # requests past the gate, not health checks
        self.ended = False       # the streams still running were told to end
        self._timeouts: set[asyncio.Timeout] = set()
        self._ended: Optional[asyncio.Future] = None

    @property
    def draining(self) -> bool:
        """Readiness fails from the signal on."""
        return self.signalled_at is not None

    @property
    def refusing(self) -> bool:
        """New requests get 503 (after the pre-drain delay)."""
        return self.signalled_at is not None and self.clock() - self.signalled_at >= self.delay_s

    def begin(self) -> bool:
        """Start draining (safe in a signal handler: it only sets attributes). False if it had begun."""
        if self.signalled_at is not None:
            return False
        self.signalled_at = self.clock()
        return True

    def step(self) -> bool:
        """Called periodically in the event loop; True once the server may shut down."""
        if self.signalled_at is None:
            return False
        elapsed = self.clock() - self.signalled_at
        if elapsed >= self.grace_s - self.margin_s and not self.ended:
            self.end_requests()
        if elapsed >= self.grace_s:
            return True
        return elapsed >= self.delay_s and self.active == 0

    def end_requests(self) -> None:
        """Tell the requests still running to end now (streams: error event and [DONE])."""
        self.ended = True
        now = asyncio.get_running_loop().time()
        for t in list(self._timeouts):
            try:
                t.reschedule(now)
            except RuntimeError:  # expiring already
                pass
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    @contextmanager
    def bounding(self, timeout: asyncio.Timeout) -> Iterator[None]:
        """While inside, `timeout` also fires when the drain ends the requests (check `ended`)."""
        if self.ended:
            timeout.reschedule(asyncio.get_running_loop().time())
        self._timeouts.add(timeout)
        try:
            yield
        finally:
            self._timeouts.discard(timeout)

    def ended_future(self) -> asyncio.Future:
        """Done once the drain ends the requests (for asyncio.wait)."""
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
            if self.ended:
                self._ended.set_result(None)
        return self._ended
