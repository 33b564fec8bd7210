"""Admission control: at most `max_in_flight` requests run, at most `max_waiting` wait.

Beyond both, a request is refused at once with 429 and Retry-After: queuing it would
only make every client wait longer.
"""
from __future__ import annotations

import asyncio
from collections import deque

from .errors import over_capacity


class Admission:
    def __init__(self, max_in_flight: int, max_waiting: int, retry_after: int = 1) -> None:
        self.max_in_flight, self.max_waiting, self.retry_after = max_in_flight, max_waiting, retry_after
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in line if allowed; raises 429 when the line is full."""
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise over_capacity(f"the server is at capacity ({self.max_in_flight} requests running, "
                                f"{self.max_waiting} waiting); retry later", self.retry_after)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over: in_flight already counts us
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us just as we gave up
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot over; in_flight unchanged
                return
        self.in_flight -= 1
