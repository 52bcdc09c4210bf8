"""The KV cache as vLLM V1 manages it: a pool of fixed-size blocks with automatic prefix
caching.

A full block of prompt tokens is identified by the hash of its tokens and of its parent
block's hash, so a block hash names the whole prefix up to it. Blocks are ref-counted; a
block nobody uses any more goes to the free queue *keeping its hash*, so a later request
with the same prefix can take it back (a cache hit). When new blocks are needed they are
taken from the head of the free queue, least recently freed first, and a cached one
loses its hash then (eviction). Nothing here knows about time or asyncio.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

# The parent of a sequence's first block (vLLM seeds its chain with a fixed value too; a
# per-process random seed would break what the router relies on: same prefix, same hashes).
ROOT_HASH = b"gpufleet-sim-kv-root"


def block_hashes(tokens: Sequence[str], block_size: int, parent: bytes = ROOT_HASH) -> list[bytes]:
    """The chained hashes of the full blocks of ``tokens`` (a partial last block has none),
    the first one chained to ``parent`` (the hash of the block before them, if any)."""
    hashes: list[bytes] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        content = "\x1f".join(tokens[start:start + block_size]).encode("utf-8", "surrogatepass")
        parent = hashlib.blake2b(parent + content, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """``num_blocks`` KV blocks: reference counts, the hash → block map of cached blocks and
    the free queue (an LRU: head = evicted first)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks with no user (never used, or cached and evictable)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: the share of blocks in use (cached free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """The longest run of cached blocks that matches ``hashes`` from the start, at most ``max_blocks``."""
        cached = self._cached
        hit: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block = cached.get(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit

    def num_evictable_in(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` sit in the free queue (taking them shrinks what is free)."""
        refs = self._refs
        return sum(1 for block in blocks if refs[block] == 0)

    def take(self, blocks: Sequence[int]) -> None:
        """Reuse cached ``blocks`` (a prefix hit): one more reference each."""
        refs, free = self._refs, self._free
        for block in blocks:
            if refs[block] == 0:
                del free[block]
            refs[block] += 1

    def allocate(self, count: int) -> list[int] | None:
        """``count`` fresh blocks from the head of the free queue (evicting cached ones), or None."""
        free = self._free
        if count > len(free):
            return None
        refs, hash_of, cached = self._refs, self._hash_of, self._cached
        blocks = []
        for _ in range(count):
            block, _ = free.popitem(last=False)
            old = hash_of[block]
            if old is not None:
                hash_of[block] = None
                if cached.get(old) == block:
                    del cached[old]
            refs[block] = 1
            blocks.append(block)
        return blocks

    def cache(self, block: int, block_hash: bytes) -> None:
        """Name a full, computed block by its hash. If another block already holds that
        prefix (two identical prompts prefilled at once) the existing one stays the cached copy."""
        if self._hash_of[block] is None and block_hash not in self._cached:
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of a sequence's ``blocks``. They are queued in reverse
        order, as vLLM does, so that the tail of a prefix is evicted before its head."""
        refs, free = self._refs, self._free
        for block in reversed(blocks):
            refs[block] -= 1
            if refs[block] == 0:
                free[block] = None
