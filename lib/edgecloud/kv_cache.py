"""The two KV caches, both reporting hits and misses.

EdgeStateCache: llama.cpp states (KV cache + logits) in an LRU keyed by the token prefix they hold; a lookup
returns the entry sharing the longest prefix with the new context, so only the rest is evaluated.
BlockPrefixCache: the cloud's prefix cache. A sequence's tokens are cut into fixed-size blocks; block i's hash
chains the hashes of blocks 0..i (as vLLM's prefix caching does), so one dict lookup per block finds the longest
cached block prefix. Entries (token list + model KV state) are evicted least-recently-used when the blocks they
hold exceed `max_blocks`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if len(diff) else n


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one token
    misses: int = 0
    reused_tokens: int = 0
    looked_up_tokens: int = 0
    evictions: int = 0
    entries: int = 0

    def to_json(self) -> dict:
        out = asdict(self)
        out["hit_rate"] = round(self.hits / self.lookups, 4) if self.lookups else 0.0
        out["token_reuse_rate"] = round(self.reused_tokens / self.looked_up_tokens, 4) if self.looked_up_tokens else 0.0
        return out


class EdgeStateCache:
    """LRU of llama.cpp states keyed by the tuple of tokens they hold."""

    def __init__(self, max_size: int = 16):
        self.max_size = max_size
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.stats = CacheStats()

    def lookup(self, tokens: list[int]) -> tuple[int, Any]:
        """(shared prefix length, state) of the best entry, or (0, None)."""
        self.stats.lookups += 1
        self.stats.looked_up_tokens += len(tokens)
        best, best_len = None, 0
        for key in self.entries:
            n = common_prefix(key, tokens)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            self.stats.misses += 1
            return 0, None
        self.entries.move_to_end(best)
        self.stats.hits += 1
        self.stats.reused_tokens += best_len
        return best_len, self.entries[best]

    def put(self, tokens: list[int], state: Any):
        key = tuple(tokens)
        self.entries[key] = state
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)
            self.stats.evictions += 1
        self.stats.entries = len(self.entries)


@dataclass
class BlockStats(CacheStats):
    block_size: int = 16
    looked_up_blocks: int = 0
    hit_blocks: int = 0
    cached_blocks: int = 0


def block_hashes(tokens: list[int], block_size: int) -> list[str]:
    """Chained hashes of the full blocks of `tokens`."""
    hashes, prev = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = np.asarray(tokens[start:start + block_size], dtype=np.int64).tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        hashes.append(prev.hex())
    return hashes


class BlockPrefixCache:
    """Cloud prefix cache over hashed fixed-size token blocks, LRU by entry, capacity in blocks."""

    def __init__(self, block_size: int = 16, max_blocks: int = 4096):
        self.block_size, self.max_blocks = block_size, max_blocks
        self.entries: OrderedDict[int, tuple[list[int], list[str], Any]] = OrderedDict()  # tokens, block hashes, state
        self.index: dict[str, int] = {}  # block hash -> entry id
        self.next_id = 0
        self.stats = BlockStats(block_size=block_size)

    def take(self, tokens: list[int]) -> tuple[int, Any]:
        """Remove and return (reusable prefix length, state) of the entry with the longest block match.

        The caller owns the state while it extends it, then `put`s it back under the longer sequence."""
        hashes = block_hashes(tokens, self.block_size)
        self.stats.lookups += 1
        self.stats.looked_up_tokens += len(tokens)
        self.stats.looked_up_blocks += len(hashes)
        entry_id, matched = None, 0
        for i, h in enumerate(hashes):
            if self.index.get(h) not in self.entries:
                break
            entry_id, matched = self.index[h], i + 1
        if entry_id is None:
            self.stats.misses += 1
            return 0, None
        cached_tokens, cached_hashes, state = self.entries.pop(entry_id)
        self._unindex(entry_id, cached_hashes)
        reuse = common_prefix(cached_tokens, tokens)  # whole blocks matched, plus any partial tail
        self.stats.hits += 1
        self.stats.hit_blocks += matched
        self.stats.reused_tokens += reuse
        self._update_sizes()
        return reuse, state

    def put(self, tokens: list[int], state: Any):
        entry_id, self.next_id = self.next_id, self.next_id + 1
        hashes = block_hashes(tokens, self.block_size)
        self.entries[entry_id] = (list(tokens), hashes, state)
        for h in hashes:
            self.index[h] = entry_id
        while self._blocks() > self.max_blocks and len(self.entries) > 1:
            old_id, (_, old_hashes, _) = self.entries.popitem(last=False)
            self._unindex(old_id, old_hashes)
            self.stats.evictions += 1
        self._update_sizes()

    def _unindex(self, entry_id: int, hashes: list[str]):
        for h in hashes:
            if self.index.get(h) == entry_id:
                del self.index[h]

    def _blocks(self) -> int:
        return sum(-(-len(t) // self.block_size) for t, _, _ in self.entries.values())

    def _update_sizes(self):
        self.stats.entries = len(self.entries)
        self.stats.cached_blocks = self._blocks()
