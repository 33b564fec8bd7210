"""Admission sized to what the model can serve.

A model decodes at most `slots` sequences at once (its `max_num_seqs`, the KV slots).
The adapter counts the sequences it has sent to each model and never sends more, so
nothing waits unseen in the model's own queue. A request that finds every slot busy may
wait here only while its expected wait stays under `max_wait_s`; otherwise it gets 429
`over_capacity` at once, with `Retry-After` set to that wait rounded up, so the client
can back off instead of sitting in a queue.

The expected wait: `duration` is a moving average of how long this model's recent
requests held their slots, so a running sequence of age `a` should free its slot in
about `duration - a`, and whoever takes that slot holds it `duration` again. A request
that needs k more slots to free up (the sequences ahead of it in line plus its own)
waits until the k-th of those times. Counting from the running sequences' ages, not
only from the rate `slots / duration`, matters: requests that started together (a burst,
or clients retrying after the same Retry-After) also end together, and whoever is first
in line waits for that whole cohort. Before any request of a model has finished there
is no estimate, and nobody waits: beyond the slots it is 429.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import over_capacity


class DurationAverage:
    """Exponential moving average of how long requests held their slots (seconds)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.mean: Optional[float] = None

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.mean = seconds if self.mean is None else self.mean + self.alpha * (seconds - self.mean)


def expected_wait(need: int, remaining: list[float], duration: float) -> float:
    """Seconds until `need` more slots are free, given the expected remaining time of each
    busy slot (each in [0, duration]); a slot freed is taken again for `duration`."""
    if need <= 0:
        return 0.0
    if not remaining:
        return need * duration
    rounds, i = divmod(need - 1, len(remaining))
    return sorted(remaining)[i] + rounds * duration


@dataclass
class Decision:
    """What to do with a request that arrives now: "run", "wait" or "refuse"; `wait_s` is
    the expected wait (None: no estimate yet)."""

    action: str
    wait_s: Optional[float] = None

    def retry_after(self, default: int) -> int:
        return default if self.wait_s is None else max(1, math.ceil(self.wait_s))


def decide(*, remaining: list[float], queued: int, waiters: int, weight: int, slots: int,
           duration: Optional[float], max_wait_s: float, max_waiting: int) -> Decision:
    """The admission rule, free of clocks and futures (unit-tested as is). `remaining`:
    the expected remaining time of each busy slot (one per running sequence)."""
    used = len(remaining)
    weight = min(weight, slots)  # a request larger than the model runs alone
    if not waiters and used + weight <= slots:
        return Decision("run", 0.0)
    if duration is None:
        return Decision("refuse")
    wait = expected_wait(used + queued + weight - slots, remaining, duration)
    if wait > max_wait_s or waiters >= max_waiting:
        return Decision("refuse", wait)
    return Decision("wait", wait)


@dataclass(eq=False)
class Ticket:
    """An admitted request: give it back with `Admission.release`."""

    model: str
    weight: int
    admitted_at: float
    released: bool = False


class _Line:
    """One model: its slots, the sequences in it, and who waits for them (in order)."""

    def __init__(self, model: str, slots: int) -> None:
        self.model, self.slots = model, slots
        self.used = 0       # sequences in the model
        self.running = 0    # requests in the model
        self.queued = 0     # sequences waiting
        self.tickets: set[Ticket] = set()  # the running requests
        self.waiters: deque[tuple[int, asyncio.Future]] = deque()
        self.durations = DurationAverage()


class Admission:
    """Per-model admission. `acquire(model, slots, weight)` returns a Ticket, waits in line
    (cancellable) or raises 429; `release(ticket)` frees the slots and hands them on."""

    def __init__(self, max_wait_s: float, max_waiting: int, retry_after: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_wait_s, self.max_waiting, self.retry_after = max_wait_s, max_waiting, retry_after
        self.clock = clock
        self.lines: dict[str, _Line] = {}

    @property
    def in_flight(self) -> int:
        """Requests in the models (all models)."""
        return sum(line.running for line in self.lines.values())

    @property
    def waiting(self) -> int:
        """Requests waiting for slots (all models)."""
        return sum(len(line.waiters) for line in self.lines.values())

    def full(self, model: str) -> bool:
        """Every slot of the model is taken."""
        line = self.lines.get(model)
        return line is not None and line.used >= line.slots

    def line(self, model: str, slots: int) -> _Line:
        line = self.lines.get(model)
        if line is None:
            line = self.lines[model] = _Line(model, max(1, slots))
        elif line.slots != max(1, slots):  # the model was reloaded with other slots
            line.slots = max(1, slots)
            self._hand_over(line)
        return line

    def decide(self, model: str, slots: int, weight: int = 1) -> Decision:
        line = self.line(model, slots)
        d = line.durations.mean
        now = self.clock()
        remaining = [min(d, max(0.0, d - (now - t.admitted_at))) if d is not None else 0.0
                     for t in line.tickets for _ in range(t.weight)]
        return decide(remaining=remaining, queued=line.queued, waiters=len(line.waiters), weight=weight,
                      slots=line.slots, duration=d, max_wait_s=self.max_wait_s, max_waiting=self.max_waiting)

    def refuse_if_full(self, model: str, slots: int, weight: int = 1) -> None:
        """Raise the 429 that `acquire` would raise now, taking nothing: callers check this
        before their own costly steps (the accounts' reservation, two transactions), so a
        burst of refused requests costs next to nothing."""
        line = self.line(model, slots)
        d = self.decide(model, slots, max(1, min(weight, line.slots)))
        if d.action == "refuse":
            self._refuse(line, d)

    def _refuse(self, line: _Line, d: Decision):
        ra = d.retry_after(self.retry_after)
        why = ("no request of this model has finished yet, so there is no wait estimate"
               if d.wait_s is None else
               f"the expected wait of {d.wait_s:.1f} s is over the {self.max_wait_s:g} s bound"
               if d.wait_s > self.max_wait_s else f"{len(line.waiters)} requests are waiting already")
        raise over_capacity(f"the model {line.model!r} is at capacity ({line.used} of {line.slots} sequences "
                            f"running, {len(line.waiters)} requests waiting; {why}); retry after {ra} s", ra)

    async def acquire(self, model: str, slots: int, weight: int = 1) -> Ticket:
        """A place in the model for `weight` sequences; raises 429 when the wait would be too long."""
        line = self.line(model, slots)
        weight = max(1, min(weight, line.slots))
        d = self.decide(model, slots, weight)
        if d.action == "run":
            return self._admit(line, weight)
        if d.action == "refuse":
            self._refuse(line, d)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (weight, fut)
        line.waiters.append(entry)
        line.queued += weight
        try:
            return await fut  # _hand_over admitted us: the ticket is counted already
        except BaseException:
            if entry in line.waiters:
                line.waiters.remove(entry)
                line.queued -= weight
            elif fut.done() and not fut.cancelled():
                self.release(fut.result())  # the slots came just as we gave up
            raise

    def release(self, ticket: Ticket) -> None:
        """Give the slots back (once) and let the next in line in."""
        if ticket.released:
            return
        ticket.released = True
        line = self.lines[ticket.model]
        line.used -= ticket.weight
        line.running -= 1
        line.tickets.discard(ticket)
        line.durations.observe(self.clock() - ticket.admitted_at)
        self._hand_over(line)

    def _admit(self, line: _Line, weight: int) -> Ticket:
        line.used += weight
        line.running += 1
        ticket = Ticket(line.model, weight, self.clock())
        line.tickets.add(ticket)
        return ticket

    def _hand_over(self, line: _Line) -> None:
        while line.waiters:
            weight, fut = line.waiters[0]
            if fut.done():  # cancelled while waiting
                line.waiters.popleft()
                line.queued -= weight
                continue
            weight_now = min(weight, line.slots)
            if line.used and line.used + weight_now > line.slots:
                return  # in order: the head waits for enough slots
            line.waiters.popleft()
            line.queued -= weight
            fut.set_result(self._admit(line, weight_now))
