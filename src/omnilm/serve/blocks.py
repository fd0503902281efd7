"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, prefix caching and LRU eviction (PagedAttention).

Pure Python, no tensors: this module decides which block holds which positions; the memory itself belongs to
:class:`omnilm.serve.paged_cache.PagedKVCache`, indexed by block id. Written for this project after vLLM's
block pool (its ``KVCacheBlock`` records and free queue), flattened to what a single-model engine needs.

A request's cache is its *block table*: a list of block ids, position ``p`` living in block ``table[p // size]``
at offset ``p % size``. Admission only needs free blocks; nothing is ever moved, so a running request can never
lose a position, and a finished request hands its blocks back.

Prefix caching: a *full* block is named by a digest of its tokens and of every token before it (a hash chain
over the blocks), so two prompts that share their first ``k`` full blocks share those digests. When a request
has written a full block, the engine registers it under its digest; a later request whose prompt starts with
the same tokens takes the registered blocks instead of computing them again (the common system prompt is
prefilled once). A block that nobody uses any more but that holds a digest stays cached, in least-recently-
released order, and is evicted only when a fresh block is needed.

Invariants (:meth:`BlockPool.check` verifies them):

- block 0 is the null block: never handed out; padded block tables point at it;
- every other block is in exactly one state: *free* (ref 0, no digest), *cached idle* (ref 0, a digest;
  evictable), or *in use* (ref ≥ 1, the number of block tables holding it);
- a block with a digest is full and is never written again (shared blocks are read-only), and the digest index
  maps each digest to exactly one block, which carries that digest.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

NULL_BLOCK = 0


def block_digests(token_ids: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """Digests of the full blocks of ``token_ids`` (a hash chain: each digest covers every earlier token).

    ``parent`` is the digest of the block before ``token_ids[0]`` (empty at the start of a sequence).
    """
    digests = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = ",".join(str(t) for t in token_ids[start:start + block_size]).encode()
        parent = hashlib.blake2b(parent + b"|" + block, digest_size=16).digest()
        digests.append(parent)
    return digests


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` positions (block 0 reserved), with prefix caching."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.digest: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest release first (evicted first)
        self.index: dict[bytes, int] = {}  # digest -> block
        self.hits = self.queries = 0  # prefix-cache statistics, in blocks

    @property
    def capacity(self) -> int:
        """Blocks a single request could ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now: free ones plus cached ones nobody uses."""
        return len(self.free) + len(self.idle)

    @property
    def num_in_use(self) -> int:
        return self.capacity - self.num_available

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def cached_prefix(self, digests: Sequence[bytes]) -> list[int]:
        """The registered blocks of the longest run of leading ``digests`` (nothing is taken)."""
        blocks = []
        for digest in digests:
            block = self.index.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, cached: Sequence[int], fresh: int) -> list[int] | None:
        """Take the ``cached`` blocks (shared) and ``fresh`` new ones; the table ``cached + new``.

        Checks before it commits: returns None, with nothing changed, when the blocks do not fit.
        """
        leaving_idle = sum(1 for b in cached if self.ref[b] == 0)
        if fresh + leaving_idle > self.num_available:
            return None
        for block in cached:
            if self.ref[block] == 0:
                del self.idle[block]
            self.ref[block] += 1
        new = [self._take_fresh() for _ in range(fresh)]
        return list(cached) + new

    def _take_fresh(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:  # evict the cached block released longest ago
            block, _ = self.idle.popitem(last=False)
            del self.index[self.digest[block]]
            self.digest[block] = None
        self.ref[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Give back a request's blocks; cached ones stay cached. Tails go first, so they are evicted first."""
        for block in reversed(blocks):
            if self.ref[block] <= 0:
                raise RuntimeError(f"block {block} released more often than taken (a bug in the caller)")
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if self.digest[block] is None:
                    self.free.append(block)
                else:
                    self.idle[block] = None

    def register(self, block: int, digest: bytes) -> None:
        """Name the full, written ``block`` by ``digest`` so later prompts can share it.

        If another block already carries this digest the call does nothing (``block`` stays private).
        """
        if self.ref[block] < 1:
            raise RuntimeError(f"block {block} registered while nobody holds it (a bug in the caller)")
        if self.digest[block] is not None or digest in self.index:
            return
        self.digest[block] = digest
        self.index[digest] = block

    def record_lookup(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    def check(self) -> None:
        """Raise AssertionError if an invariant of the module docstring does not hold."""
        assert self.ref[NULL_BLOCK] == 0 and self.digest[NULL_BLOCK] is None
        assert NULL_BLOCK not in self.free and NULL_BLOCK not in self.idle
        free, idle = set(self.free), set(self.idle)
        assert len(free) == len(self.free) and not free & idle
        for block in range(1, self.num_blocks):
            states = (block in free) + (block in idle) + (self.ref[block] > 0)
            assert states == 1, f"block {block} is in {states} states"
            assert self.ref[block] >= 0
            if block in free:
                assert self.digest[block] is None
            if block in idle:
                assert self.digest[block] is not None
        for digest, block in self.index.items():
            assert self.digest[block] == digest
        assert sum(d is not None for d in self.digest) == len(self.index)
