"""What runs each step, over token ids: the admission queue, who gets a KV slot next,
how many prompt tokens are computed per step, and when a request is done.

Continuous batching with chunked prefill. Each step the engine (engine_core.py) asks:

1. `drop_cancelled`: requests whose client left go, their slots free at once;
2. `next_prefill_group`: when nothing is half-prefilled, the oldest waiting requests
   whose whole prompts fit the step's budget of `prefill_chunk` tokens and have nothing
   in the prompt cache are prefilled together in one model call (two 38-token prompts
   take 0.77x the time of one after the other here, four 0.57x);
3. `next_prefill`, until the budget is spent: the request being prefilled continues, or
   the next waiting request gets a slot (`_pick_order`: first come, first served). One
   request is prefilled at a time; a long prompt is split over several steps, so running
   streams wait at most one bounded prefill per token;
4. `decoding`: every request holding a decoding row, for one decode call together;
5. `append_token` for each sampled token: EOS and the length limits end a request.

Change how the next request is picked in `_pick_order`. Where a request's KV lives is
kv_cache_manager.py's business; text, stop strings and sending are output_processor.py's.
"""

from __future__ import annotations

import queue
import threading
from collections import deque

from .error_kinds import OVER_CAPACITY, RequestError
from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus


class Scheduler:
    """`reserve`, `release` and `add_request` may be called from any thread; the rest
    from the engine thread."""

    def __init__(self, kv: KVCacheManager, *, max_model_len: int, max_queue_size: int,
                 prefill_chunk: int, eos_token_ids: list[int], max_prefill_batch: int = 8):
        self.kv = kv
        self.max_prefill_batch = max_prefill_batch
        self.max_model_len = max_model_len
        self.max_queue_size = max_queue_size
        self.prefill_chunk = max(1, prefill_chunk)
        self.eos = frozenset(eos_token_ids)
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()   # from other threads
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._pending = 0      # places taken in the queue: reserved, queued, waiting; not yet in a slot

    # -- admission (any thread) -------------------------------------------------------------
    def reserve(self) -> None:
        """Hold a place for a request that is still being tokenized, so the queue bound
        covers it too: raises over_capacity when `max_queue_size` requests already wait
        beyond the free slots. Each reserve is followed by exactly one
        `add_request(..., reserved=True)` (which keeps the place) or `release()`."""
        with self._lock:
            if self._pending >= self.max_queue_size + self.kv.free_slots():
                raise RequestError(OVER_CAPACITY, f"{self._pending} requests are waiting "
                                                  f"(max_queue_size {self.max_queue_size}); retry later")
            self._pending += 1

    def release(self, n: int = 1) -> None:
        with self._lock:
            self._pending -= n

    def add_request(self, req: Request, *, reserved: bool = False) -> None:
        """Queue a validated request; raises over_capacity when the queue is full.
        `reserved`: the caller took the place with `reserve()`."""
        if not reserved:
            self.reserve()
        self.inbox.put(req)

    # -- the engine thread ------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.kv.decoding and self.kv.prefilling is None and not self.waiting and self.inbox.empty()

    def wait_for_work(self, timeout: float) -> None:
        if self.idle:
            try:
                self.waiting.append(self.inbox.get(timeout=timeout))
            except queue.Empty:
                pass

    def drain_inbox(self) -> None:
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def drop_cancelled(self) -> list[Request]:
        """Requests whose client left (flagged by the responder's poll): out of the queue
        or their slots, FINISHED_CANCELLED. The caller tells their clients."""
        gone = [r for r in self.waiting if r.cancelled]
        if gone:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
            self.release(len(gone))
        kv = self.kv
        if kv.prefilling is not None and kv.prefilling.cancelled:
            gone.append(kv.prefilling)
            kv.release_prefill()
        rows = [i for i, r in enumerate(kv.decoding) if r.cancelled]
        if rows:
            gone += [kv.decoding[i] for i in rows]
            kv.free(rows)
        for r in gone:
            r.status = RequestStatus.FINISHED_CANCELLED
        return gone

    def _pick_order(self) -> list[Request]:
        """The waiting requests in the order they get free slots: oldest first. The one
        place to change that policy (prompts prefilled together are taken in it too)."""
        return list(self.waiting)

    def _pick_next(self) -> Request | None:
        """The waiting request that gets the next free slot, out of the queue."""
        order = self._pick_order()
        if not order:
            return None
        self.waiting.remove(order[0])
        return order[0]

    def next_prefill_group(self, budget: int) -> tuple[int, list[Request]] | None:
        """(first row, requests) for new prompts to prefill together in one call: the
        oldest waiting ones, in order, while each prompt fits whole in what is left of
        `budget`, has no block in the prompt cache (a hit is copied in and only the rest
        computed, alone) and a slot is free. None unless two or more qualify, or when the
        decoder cannot (`batched_prefill`) or a prompt is half-prefilled. At most
        `max_prefill_batch` prompts."""
        kv = self.kv
        if not getattr(kv.dec, "batched_prefill", False) or kv.prefilling is not None:
            return None
        group: list[Request] = []
        most = min(kv.free_slots(), self.max_prefill_batch)
        heads = set()   # prompts that begin alike go one after the other: the later ones hit the cache
        for req in self._pick_order():
            head = tuple(req.prompt[:kv.cache.block]) if kv.cache.enabled else None
            if len(group) == most or len(req.prompt) > budget or head in heads or kv.cache.would_hit(req.prompt):
                break
            group.append(req)
            budget -= len(req.prompt)
            if head is not None and len(req.prompt) > kv.cache.block:
                heads.add(head)
        if len(group) < 2:
            return None
        for req in group:
            self.waiting.remove(req)
            req.status = RequestStatus.PREFILLING
        self.release(len(group))
        return kv.allocate_group(group), group

    def group_done(self, group: list[Request]) -> None:
        """After their first tokens: the members decode on, those that ended leave."""
        ended = [self.kv.decoding.index(r) for r in group if r.status.finished]
        for req in group:
            if not req.status.finished:
                req.status = RequestStatus.DECODING
        if ended:
            self.kv.free(ended)

    def group_failed(self, group: list[Request]) -> None:
        for req in group:
            req.status = RequestStatus.FINISHED_FAILED
        self.kv.free([self.kv.decoding.index(r) for r in group])

    def next_prefill(self, budget: int) -> tuple[Request, list[int]] | None:
        """The next prompt tokens to compute, at most `budget`, and their request (in
        the KV manager's prefill row); None when there is nothing to prefill or no slot."""
        if budget <= 0:
            return None
        req = self.kv.prefilling
        if req is None:
            if self.kv.free_slots() < 1:
                return None
            req = self._pick_next()
            if req is None:
                return None
            self.release()
            req.status = RequestStatus.PREFILLING
            self.kv.allocate(req)
        return req, req.prompt[req.num_computed:req.num_computed + budget]

    def prefilled(self, req: Request, n: int, row: int | None = None) -> bool:
        """`n` more prompt tokens of `req` are in the KV cache (in `row`, by default the
        prefill row); True when its whole prompt is (then its blocks go to the prompt
        cache, and its logits give the first token)."""
        req.num_computed += n
        if req.num_computed < len(req.prompt):
            return False
        self.kv.cache_prompt(req, row)
        return True

    def prefill_failed(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED_FAILED
        self.kv.release_prefill()

    def first_token_done(self, req: Request) -> None:
        """After its first token a prefilled request decodes, or leaves if that ended it."""
        if req.status.finished:
            self.kv.release_prefill()
        else:
            req.status = RequestStatus.DECODING
            self.kv.start_decoding(req)

    @property
    def decoding(self) -> list[Request]:
        """The requests of the next decode call; row i is decoding[i]."""
        return self.kv.decoding

    def append_token(self, req: Request, token: int) -> bool:
        """Record a sampled token. EOS ends the request as FINISHED_STOPPED and is not an
        output token (False); an output token may end it at max_tokens or the context
        (FINISHED_LENGTH)."""
        req.next_token = token
        if token in self.eos and not req.params.ignore_eos:
            req.status = RequestStatus.FINISHED_STOPPED
            return False
        req.output.append(token)
        if len(req.output) >= req.max_tokens or len(req.prompt) + len(req.output) >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
        return True

    def finished_decoding(self, rows: list[int]) -> None:
        """These decoding rows' requests are finished: free their slots."""
        self.kv.free(rows)

    def decode_failed(self) -> list[Request]:
        lost = self.kv.drop_decoding()
        for r in lost:
            r.status = RequestStatus.FINISHED_FAILED
        return lost

    def in_flight(self) -> list[Request]:
        """Every admitted request: waiting, decoding, being prefilled."""
        p = self.kv.prefilling
        return list(self.waiting) + self.kv.decoding + ([p] if p is not None else [])

    def abort_all(self) -> list[Request]:
        """Everything in flight fails (engine failure, unload); the caller tells them."""
        self.drain_inbox()
        lost = self.in_flight()
        self.release(len(self.waiting))
        self.waiting.clear()
        self.kv.clear()
        for r in lost:
            r.status = RequestStatus.FINISHED_FAILED
        return lost

    def state(self) -> tuple[int, int, float]:
        """(waiting, running, KV usage) for the gauges."""
        running = len(self.kv.decoding) + (self.kv.prefilling is not None)
        return len(self.waiting) + self.inbox.qsize(), running, self.kv.usage()
