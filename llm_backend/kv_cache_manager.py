"""Which request's KV lives in which row of the decoder's buffer, and the prompt cache.

The decoder holds one KV row (slot) per request. Requests being decoded sit in rows
`[0, d)`, in the order one decode call takes them; the request being prefilled, if
any, in row `d`. New requests prefilled together in one call (`allocate_group`) join
the decoding rows straight away. A departure moves the last decoding row into the hole
(one copy of its filled positions per departure, not per step) and the prefilling row
down behind it.

A new request's row is filled first from the prompt cache (prefix_cache.py: the longest
cached prefix, copied in), and its prompt's full blocks are copied out once computed.
The scheduler decides who gets a row and when; this module only where.
"""

from __future__ import annotations

from .prefix_cache import PrefixCache
from .request import Request


class KVCacheManager:
    """Engine thread only (`free_slots` may be read from any thread: an estimate)."""

    def __init__(self, decoder, prefix_cache: PrefixCache | None = None):
        self.dec = decoder
        self.cache = prefix_cache or PrefixCache(0)
        self.num_slots = decoder.num_slots
        self.decoding: list[Request] = []        # row i holds decoding[i]
        self.prefilling: Request | None = None   # at row len(decoding)

    def free_slots(self) -> int:
        return self.num_slots - len(self.decoding) - (self.prefilling is not None)

    @property
    def prefill_row(self) -> int:
        return len(self.decoding)

    def allocate(self, req: Request) -> None:
        """Give `req` the row after the decoding ones, with the cached blocks of its
        prompt's prefix copied in (`num_computed` counts them)."""
        assert self.prefilling is None and self.free_slots() > 0
        self.prefilling = req
        row, block = self.prefill_row, self.cache.block
        for i, kv in enumerate(self.cache.lookup(req.prompt)):
            self.dec.write_rows(row, i * block, kv)
            req.num_computed += kv.shape[3]

    def allocate_group(self, reqs: list[Request]) -> int:
        """Rows for new requests prefilled together in one call (none has a cached
        prefix): they join the decoding rows at once, in order, and leave through
        `free` if they end at their first token. Returns the first one's row."""
        assert self.prefilling is None and self.free_slots() >= len(reqs)
        for req in reqs:   # counted as looked up (the prompt cache's hit rate); nothing is cached
            cached = self.cache.lookup(req.prompt)
            assert not cached
        first = len(self.decoding)
        self.decoding.extend(reqs)
        return first

    def cache_prompt(self, req: Request, row: int | None = None) -> None:
        """Copy the full blocks of `req`'s computed prompt (in `row`, by default the
        prefill row) into the prompt cache."""
        row, b = self.prefill_row if row is None else row, self.cache.block
        self.cache.store(req.prompt, lambda i: self.dec.read_rows(row, i * b, (i + 1) * b))

    def start_decoding(self, req: Request) -> None:
        """The prefilled request joins the decoding rows (it is already in place)."""
        assert req is self.prefilling
        self.prefilling = None
        self.decoding.append(req)

    def release_prefill(self) -> None:
        self.prefilling = None

    def free(self, rows: list[int]) -> None:
        """Free these decoding rows, keeping the rest packed."""
        for i in sorted(rows, reverse=True):
            last = len(self.decoding) - 1
            if i != last:
                moved = self.decoding[last]
                self.dec.move_row(last, i, moved.num_computed)
                self.decoding[i] = moved
            self.decoding.pop()
            if self.prefilling is not None:   # keep it right after the decoding rows
                self.dec.move_row(last + 1, last, self.prefilling.num_computed)

    def drop_decoding(self) -> list[Request]:
        """After a failed decode call the decoding rows' KV is lost: they leave, and the
        request being prefilled (now at row 0, its KV still at its old row) starts over."""
        lost, self.decoding = self.decoding, []
        if self.prefilling is not None:
            self.prefilling.num_computed = 0
        return lost

    def clear(self) -> None:
        self.decoding = []
        self.prefilling = None

    def usage(self) -> float:
        """Filled positions over the buffer's capacity (llm_kv_cache_usage_ratio)."""
        used = sum(r.num_computed for r in self.decoding)
        if self.prefilling is not None:
            used += self.prefilling.num_computed
        return round(used / (self.num_slots * self.dec.max_len), 4)
