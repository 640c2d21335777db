"""BlockPool: allocation, reference counts, the LRU free queue and the prefix-cache map.

Every test calls `check_invariants()` after each operation; the randomized test also compares
the pool against a small reference model of the same rules.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

from engine.kv_cache.block_pool import BlockPool, KVBlock


def h(name: str) -> bytes:
    """A stand-in block hash: the pool treats hashes as opaque keys."""
    return name.encode()


def ids(blocks: list[KVBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def allocate(pool: BlockPool, n: int) -> list[KVBlock]:
    blocks = pool.allocate(n)
    pool.check_invariants()
    return blocks


def free(pool: BlockPool, blocks: list[KVBlock]) -> None:
    """Free a request's blocks the way the KV cache manager does: tail first."""
    pool.free(reversed(blocks))
    pool.check_invariants()


def cache(pool: BlockPool, blocks: list[KVBlock], prefix: str) -> None:
    for i, block in enumerate(blocks):
        pool.cache_block(block, h(f"{prefix}{i}"))
        pool.check_invariants()


def test_fresh_pool_is_all_free() -> None:
    pool = BlockPool(5)
    pool.check_invariants()
    assert pool.num_free_blocks == 5
    assert pool.usage == 0.0
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks)


def test_pool_needs_a_block() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_hands_out_distinct_referenced_blocks() -> None:
    pool = BlockPool(4)
    first = allocate(pool, 3)
    assert ids(first) == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in first)
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)
    assert ids(allocate(pool, 1)) == [3]
    assert pool.num_free_blocks == 0
    assert pool.usage == 1.0


def test_over_allocation_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    allocate(pool, 2)
    with pytest.raises(ValueError):
        pool.allocate(3)
    pool.check_invariants()
    assert pool.num_free_blocks == 2
    assert ids(allocate(pool, 2)) == [2, 3]


def test_allocate_zero_blocks() -> None:
    pool = BlockPool(2)
    assert allocate(pool, 0) == []
    assert pool.num_free_blocks == 2


def test_freed_blocks_are_reused_after_never_used_ones() -> None:
    pool = BlockPool(4)
    a = allocate(pool, 2)  # blocks 0, 1
    free(pool, a)  # queue: 2 3 1 0
    assert pool.num_free_blocks == 4
    assert all(b.ref_cnt == 0 for b in a)
    assert ids(allocate(pool, 2)) == [2, 3]
    # Tail first: block 1 went back before block 0.
    assert ids(allocate(pool, 2)) == [1, 0]


def test_cached_blocks_evicted_tail_first_within_a_request() -> None:
    pool = BlockPool(3)
    a = allocate(pool, 3)
    cache(pool, a, "a")
    free(pool, a)
    # Still findable: freeing keeps the prefix cache.
    assert [pool.get_cached_block(h(f"a{i}")) for i in range(3)] == a
    taken = allocate(pool, 1)
    assert taken == [a[2]]  # the last block of the sequence goes first
    assert taken[0].block_hash is None
    assert pool.get_cached_block(h("a2")) is None
    assert pool.get_cached_block(h("a0")) is a[0]
    assert pool.get_cached_block(h("a1")) is a[1]
    assert allocate(pool, 1) == [a[1]]
    assert pool.get_cached_block(h("a1")) is None
    assert pool.get_cached_block(h("a0")) is a[0]


def test_least_recently_freed_request_is_evicted_first() -> None:
    pool = BlockPool(4)
    a = allocate(pool, 2)
    b = allocate(pool, 2)
    cache(pool, a, "a")
    cache(pool, b, "b")
    free(pool, b)  # b freed first, although allocated later
    free(pool, a)
    assert allocate(pool, 2) == [b[1], b[0]]
    assert pool.get_cached_block(h("b0")) is None
    assert pool.get_cached_block(h("b1")) is None
    assert pool.get_cached_block(h("a0")) is a[0]
    assert pool.get_cached_block(h("a1")) is a[1]


def test_double_free_raises() -> None:
    pool = BlockPool(2)
    a = allocate(pool, 1)
    free(pool, a)
    with pytest.raises(RuntimeError):
        pool.free(a)
    pool.check_invariants()
    assert pool.num_free_blocks == 2


def test_free_of_never_allocated_block_raises() -> None:
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.free([pool.blocks[1]])
    pool.check_invariants()


def test_touch_free_cached_block_takes_it_out_of_the_free_queue() -> None:
    pool = BlockPool(3)
    a = allocate(pool, 2)
    cache(pool, a, "a")
    free(pool, a)  # queue: 2 1 0
    hit = pool.get_cached_block(h("a0"))
    assert hit is a[0]
    pool.touch([hit])
    pool.check_invariants()
    assert hit.ref_cnt == 1
    assert pool.num_free_blocks == 2
    # Allocation can no longer hand the touched block out, and it keeps its hash.
    rest = allocate(pool, 2)
    assert hit not in rest
    assert ids(rest) == [2, 1]
    assert pool.get_cached_block(h("a0")) is hit
    with pytest.raises(ValueError):
        pool.allocate(1)


def test_touch_in_use_block_adds_a_reference() -> None:
    pool = BlockPool(2)
    a = allocate(pool, 1)
    cache(pool, a, "a")
    pool.touch(a)
    pool.check_invariants()
    assert a[0].ref_cnt == 2
    assert pool.num_free_blocks == 1
    free(pool, a)
    assert a[0].ref_cnt == 1
    assert pool.num_free_blocks == 1  # still referenced by the other user
    free(pool, a)
    assert pool.num_free_blocks == 2
    assert pool.get_cached_block(h("a0")) is a[0]


def test_touched_then_freed_block_becomes_most_recently_freed() -> None:
    pool = BlockPool(3)
    a = allocate(pool, 3)
    cache(pool, a, "a")
    free(pool, a)  # queue: 2 1 0
    pool.touch([a[2]])
    pool.check_invariants()
    free(pool, [a[2]])  # queue: 1 0 2
    assert allocate(pool, 3) == [a[1], a[0], a[2]]


def test_cache_block_keeps_the_first_block_for_a_hash() -> None:
    pool = BlockPool(3)
    a, b = allocate(pool, 1), allocate(pool, 1)
    pool.cache_block(a[0], h("x"))
    pool.check_invariants()
    pool.cache_block(b[0], h("x"))  # computed the same prefix concurrently
    pool.check_invariants()
    assert pool.get_cached_block(h("x")) is a[0]
    assert b[0].block_hash is None


def test_cache_block_does_not_rehash_a_cached_block() -> None:
    pool = BlockPool(1)
    a = allocate(pool, 1)
    pool.cache_block(a[0], h("x"))
    pool.cache_block(a[0], h("y"))
    pool.check_invariants()
    assert pool.get_cached_block(h("x")) is a[0]
    assert pool.get_cached_block(h("y")) is None


def test_disabled_caching_never_finds_anything() -> None:
    pool = BlockPool(2, enable_caching=False)
    a = allocate(pool, 1)
    pool.cache_block(a[0], h("x"))
    pool.check_invariants()
    assert a[0].block_hash is None
    assert pool.get_cached_block(h("x")) is None


def test_reset_prefix_cache_forgets_every_hash() -> None:
    pool = BlockPool(3)
    a = allocate(pool, 3)
    cache(pool, a, "a")
    free(pool, a[:2])
    pool.reset_prefix_cache()
    pool.check_invariants()
    assert all(pool.get_cached_block(h(f"a{i}")) is None for i in range(3))
    assert all(b.block_hash is None for b in a)
    assert pool.num_free_blocks == 2


class ReferencePool:
    """The pool's rules restated as plain lists: ref counts, the eviction order of free
    blocks, and the hash map."""

    def __init__(self, num_blocks: int) -> None:
        self.ref = [0] * num_blocks
        self.free_order = list(range(num_blocks))
        self.hash_of: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}

    def allocate(self, n: int) -> list[int]:
        taken, self.free_order = self.free_order[:n], self.free_order[n:]
        for block_id in taken:
            self.cached.pop(self.hash_of.pop(block_id, b""), None)
            self.ref[block_id] = 1
        return taken

    def touch(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if self.ref[block_id] == 0:
                self.free_order.remove(block_id)
            self.ref[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            self.ref[block_id] -= 1
            if self.ref[block_id] == 0:
                self.free_order.append(block_id)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        if block_id in self.hash_of or block_hash in self.cached:
            return
        self.hash_of[block_id] = block_hash
        self.cached[block_hash] = block_id


def assert_matches(pool: BlockPool, ref: ReferencePool, known_hashes: list[bytes]) -> None:
    pool.check_invariants()
    assert [b.ref_cnt for b in pool.blocks] == ref.ref
    assert pool.num_free_blocks == len(ref.free_order)
    for block_hash in known_hashes:
        found = pool.get_cached_block(block_hash)
        expected = ref.cached.get(block_hash)
        assert (found.block_id if found else None) == expected, block_hash


OPS = ("allocate", "free", "touch", "cache", "double_free")


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_match_reference_model(seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = 12
    pool, ref = BlockPool(num_blocks), ReferencePool(num_blocks)
    # Each owner stands for a request holding one reference on each of its blocks.
    owners: list[list[int]] = []
    known_hashes: list[bytes] = []
    done: Counter[str] = Counter()
    for step in range(600):
        # Weighted so the pool keeps cycling between full and empty.
        op = rng.choices(OPS, weights=(4, 4, 1, 3, 1))[0]
        if op == "allocate":
            n = rng.randint(0, 5)
            if n > len(ref.free_order):
                with pytest.raises(ValueError):
                    pool.allocate(n)
                done["refused"] += 1
            else:
                num_cached = len(ref.cached)
                allocated = ids(pool.allocate(n))
                assert allocated == ref.allocate(n)
                owners.append(allocated)
                done["evict"] += len(ref.cached) < num_cached
                done[op] += 1
        elif op == "free" and owners:
            blocks = owners.pop(rng.randrange(len(owners)))
            pool.free(pool.blocks[i] for i in reversed(blocks))
            ref.free(blocks)
            done[op] += 1
        elif op == "touch" and ref.cached:
            chain = rng.sample(sorted(ref.cached.values()), rng.randint(1, min(3, len(ref.cached))))
            found = [pool.get_cached_block(ref.hash_of[i]) for i in chain]
            assert [b.block_id for b in found if b] == chain
            pool.touch(found)
            done["touch_free"] += any(ref.ref[i] == 0 for i in chain)
            ref.touch(chain)
            owners.append(chain)
            done[op] += 1
        elif op == "cache" and any(owners):
            block_id = rng.choice(rng.choice([o for o in owners if o]))
            # Reusing an old name exercises the "first block keeps the hash" rule.
            if known_hashes and rng.random() < 0.3:
                block_hash = rng.choice(known_hashes)
            else:
                block_hash = h(f"s{seed}-{step}")
                known_hashes.append(block_hash)
            pool.cache_block(pool.blocks[block_id], block_hash)
            ref.cache_block(block_id, block_hash)
            done[op] += 1
        elif op == "double_free" and ref.free_order:
            block_id = rng.choice(ref.free_order)
            with pytest.raises(RuntimeError):
                pool.free([pool.blocks[block_id]])
            done[op] += 1
        assert_matches(pool, ref, known_hashes)
    for blocks in owners:
        pool.free(pool.blocks[i] for i in reversed(blocks))
        ref.free(blocks)
    assert_matches(pool, ref, known_hashes)
    assert pool.num_free_blocks == num_blocks
    # The sequence must actually have exercised every rule, not just run.
    kinds = ("allocate", "refused", "evict", "free", "touch", "touch_free", "cache", "double_free")
    assert all(done[k] >= 5 for k in kinds), done
