"""Prompt (prefix) cache: KV of prompt blocks, reused by requests sharing a prefix.

Prompts are cut into blocks of `block` tokens. A block is keyed by a hash of the whole
prefix up to its end (vLLM's automatic prefix caching), so a hit on block i implies
the same tokens before it. Values are the block's keys/values for all layers, copied
out of a slot after prefill and copied into a new slot on admission. Least recently
used blocks go first when the byte budget is full.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class PrefixCache:
    def __init__(self, capacity_bytes: int, block: int = 16):
        self.capacity = capacity_bytes
        self.block = block
        self.blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.used = 0
        self.hits = 0          # tokens served from the cache
        self.queries = 0       # prompt tokens looked up

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _keys(self, tokens: list[int], nblocks: int) -> list[int]:
        keys, h = [], 0
        for i in range(nblocks):
            h = hash((h, tuple(tokens[i * self.block:(i + 1) * self.block])))
            keys.append(h)
        return keys

    def lookup(self, tokens: list[int]) -> list[np.ndarray]:
        """Cached blocks for the longest cached prefix, leaving at least one prompt token
        to compute (its logits give the first output token)."""
        if not self.enabled:
            return []
        self.queries += len(tokens)
        out = []
        for key in self._keys(tokens, (len(tokens) - 1) // self.block):
            kv = self.blocks.get(key)
            if kv is None:
                break
            self.blocks.move_to_end(key)
            out.append(kv)
        self.hits += len(out) * self.block
        return out

    def missing(self, tokens: list[int]) -> list[tuple[int, int]]:
        """(block index, key) of the full prompt blocks not cached yet."""
        if not self.enabled:
            return []
        keys = self._keys(tokens, len(tokens) // self.block)
        return [(i, k) for i, k in enumerate(keys) if k not in self.blocks]

    def insert(self, key: int, kv: np.ndarray) -> None:
        if kv.nbytes > self.capacity:
            return
        while self.used + kv.nbytes > self.capacity and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.used -= old.nbytes
        self.blocks[key] = kv
        self.used += kv.nbytes
