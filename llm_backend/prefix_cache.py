"""Prompt (prefix) cache: KV of prompt blocks, reused by requests sharing a prefix.

Prompts are cut into blocks of `block` tokens. A block is keyed by a SHA-256 over its
parent block's key and its own token ids, so a key stands for the whole prefix up to the
block's end (vLLM's automatic prefix caching; SHA-256 since GHSA-rm76-4mrf-v9r8). A hit
also compares the stored parent key and tokens, so even a colliding key never hands a
request another prompt's KV. Values are the block's keys/values for all layers, copied
out of a slot after prefill and copied into a new slot on admission.

Least recently used blocks go first when the byte budget is full. A block is useful only
after its whole prefix, so a chain is kept in LRU order tail first: on insert and on a
hit its last block becomes the oldest of the chain and its head the newest, and
eviction takes a chain's tails before its head (vLLM frees blocks in reverse order).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np


def _block_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    return hashlib.sha256(parent + np.asarray(tokens, dtype=np.int64).tobytes()).digest()


class BlockKey(NamedTuple):
    digest: bytes                 # _block_hash(parent, tokens): the whole prefix
    parent: bytes                 # the previous block's digest (b"" for the first)
    tokens: tuple[int, ...]


class _Entry(NamedTuple):
    key: BlockKey
    kv: np.ndarray


class PrefixCache:
    def __init__(self, capacity_bytes: int, block: int = 16):
        self.capacity = capacity_bytes
        self.block = block
        self.blocks: OrderedDict[bytes, _Entry] = OrderedDict()   # oldest first
        self.used = 0
        self.hits = 0          # tokens served from the cache
        self.queries = 0       # prompt tokens looked up

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _chain(self, tokens: list[int], nblocks: int) -> list[BlockKey]:
        keys, parent = [], b""
        for i in range(nblocks):
            block = tuple(tokens[i * self.block:(i + 1) * self.block])
            digest = _block_hash(parent, block)
            keys.append(BlockKey(digest, parent, block))
            parent = digest
        return keys

    def _get(self, key: BlockKey) -> np.ndarray | None:
        entry = self.blocks.get(key.digest)
        return entry.kv if entry is not None and entry.key == key else None

    def _refresh(self, keys: list[BlockKey]) -> None:
        """Make a chain the most recent, its head newest (evicted last)."""
        for key in reversed(keys):
            self.blocks.move_to_end(key.digest)

    def lookup(self, tokens: list[int]) -> list[np.ndarray]:
        """Cached blocks for the longest cached prefix, leaving at least one prompt token
        to compute (its logits give the first output token)."""
        if not self.enabled:
            return []
        self.queries += len(tokens)
        out, hit = [], []
        for key in self._chain(tokens, (len(tokens) - 1) // self.block):
            kv = self._get(key)
            if kv is None:
                break
            out.append(kv)
            hit.append(key)
        self._refresh(hit)
        self.hits += len(out) * self.block
        return out

    def would_hit(self, tokens: list[int]) -> bool:
        """Would `lookup` find a cached block (its first)? Counts and refreshes nothing."""
        if not self.enabled or (len(tokens) - 1) // self.block < 1:
            return False
        return self._get(self._chain(tokens, 1)[0]) is not None

    def missing(self, tokens: list[int]) -> list[tuple[int, BlockKey]]:
        """(block index, key) of the full prompt blocks not cached yet."""
        if not self.enabled:
            return []
        keys = self._chain(tokens, len(tokens) // self.block)
        return [(i, k) for i, k in enumerate(keys) if self._get(k) is None]

    def store(self, tokens: list[int], read_block: Callable[[int], np.ndarray]) -> None:
        """Cache the full blocks of a computed prompt; `read_block(i)` gives block i's KV.
        Tails are inserted first, so a chain longer than the budget keeps its head."""
        if not self.enabled:
            return
        keys = self._chain(tokens, len(tokens) // self.block)
        for i in reversed(range(len(keys))):
            if self._get(keys[i]) is None:
                self.insert(keys[i], read_block(i))
        self._refresh([k for k in keys if self._get(k) is not None])

    def insert(self, key: BlockKey, kv: np.ndarray) -> None:
        entry = self.blocks.get(key.digest)
        if entry is not None:
            if entry.key == key:           # already cached: count its bytes once
                self.blocks.move_to_end(key.digest)
            return                         # a colliding key keeps the block it has
        if kv.nbytes > self.capacity:
            return
        while self.used + kv.nbytes > self.capacity and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.used -= old.kv.nbytes
        self.blocks[key.digest] = _Entry(key, kv)
        self.used += kv.nbytes
