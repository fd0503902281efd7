"""The block pool's bookkeeping as a state machine: hypothesis searches for a sequence of allocations, releases
and prefix registrations that breaks an invariant or hands one block to two writers."""

from __future__ import annotations

from collections import Counter

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from omnilm.serve.blocks import NULL_BLOCK, BlockPool, block_digests


def test_digests_chain_over_every_earlier_token() -> None:
    a = block_digests([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # the trailing partial block has no digest
    assert block_digests([1, 2, 3, 4], 2) == a[:2]
    assert block_digests([9, 2, 3, 4], 2)[1] != a[1]  # same block, different history
    assert block_digests([3, 4, 5, 6], 2, parent=a[0]) == a[1:]


class PoolMachine(RuleBasedStateMachine):
    """Tables are what requests hold; ``written`` marks blocks a table wrote itself (fresh, so private)."""

    @initialize(num_blocks=st.integers(2, 12), block_size=st.integers(1, 4))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.tables: list[list[int]] = []
        self.fresh: list[set[int]] = []
        self.contents: dict[int, bytes] = {}  # block -> digest it was registered with

    @rule(prefix=st.lists(st.integers(0, 3), max_size=8), fresh=st.integers(0, 6))
    def allocate(self, prefix: list[int], fresh: int) -> None:
        digests = block_digests(prefix, self.pool.block_size)
        cached = self.pool.cached_prefix(digests)
        assert all(self.pool.digest[b] == d for b, d in zip(cached, digests, strict=False))
        available = self.pool.num_available
        leaving_idle = sum(1 for b in cached if self.pool.ref[b] == 0)
        table = self.pool.allocate(cached, fresh)
        if fresh + leaving_idle > available:
            assert table is None and self.pool.num_available == available  # nothing changed
            return
        assert table is not None and table[: len(cached)] == cached
        new = table[len(cached):]
        holders = Counter(b for t in self.tables for b in t)
        assert NULL_BLOCK not in new and len(set(new)) == len(new)
        assert not any(holders[b] for b in new), "a fresh block is already held by another table"
        assert all(self.pool.digest[b] is None for b in new)
        self.tables.append(table)
        self.fresh.append(set(new))

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.tables) - 1))
        self.pool.release(self.tables.pop(index))
        self.fresh.pop(index)

    @precondition(lambda self: any(self.fresh))
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=8))
    def register(self, data: st.DataObject, tokens: list[int]) -> None:
        owner = data.draw(st.sampled_from([i for i, f in enumerate(self.fresh) if f]))
        block = data.draw(st.sampled_from(sorted(self.fresh[owner])))
        digest = block_digests(tokens, 1)[-1]
        taken = digest in self.pool.index
        self.pool.register(block, digest)
        if not taken and self.pool.digest[block] == digest:
            self.fresh[owner].discard(block)  # now shared and read-only
        assert self.pool.index[digest] in range(1, self.pool.num_blocks)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "pool"):
            return
        self.pool.check()
        holders = Counter(b for t in self.tables for b in t)
        for block in range(1, self.pool.num_blocks):
            assert self.pool.ref[block] == holders[block]
        assert self.pool.num_in_use == len(holders)


TestBlockPool = PoolMachine.TestCase
