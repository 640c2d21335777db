"""The pool of fixed-size KV blocks: the only owner of reference counts, the free queue and
the prefix-cache map.

A block is in exactly one of three states:

    in use           ref_cnt > 0, not in the free queue (may also be cached: hash set)
    free + cached    ref_cnt == 0, in the free queue, hash set, findable by hash
    free             ref_cnt == 0, in the free queue, no hash

The free queue is ordered by eviction priority (least recently freed first). Allocation pops
its head and, if that block was cached, evicts it from the hash map; a cache hit on a free
block takes it out of the queue ("touch"), so cached blocks stay reusable until the memory is
actually needed.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from engine.kv_cache.block_hash import BlockHash
from engine.kv_cache.kv_events import KvEventRecorder


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "group")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        # The KV cache group whose prefix cache finds it by hash (engine/kv_cache/groups.py).
        self.group = 0

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    def __init__(
        self, num_blocks: int, *, enable_caching: bool = True, num_groups: int = 1
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Insertion order = eviction order; values unused.
        self._free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # One hash map per KV cache group: the same prefix has a block in every group, each
        # holding its own layers' KV.
        self._cached_by_group: list[dict[BlockHash, KVBlock]] = [{} for _ in range(num_groups)]
        self._cached = self._cached_by_group[0]
        # Removals and clears for cache-aware routers (engine.kv_cache.kv_events).
        self.events = KvEventRecorder()

    @property
    def num_free_blocks(self) -> int:
        """Blocks that allocate() can hand out now (free, cached or not)."""
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free_queue) / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash, group: int = 0) -> KVBlock | None:
        return self._cached_by_group[group].get(block_hash) if self.enable_caching else None

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        if num_blocks > len(self._free_queue):
            raise ValueError(f"cannot allocate {num_blocks} blocks, {len(self._free_queue)} free")
        allocated = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            allocated.append(block)
        return allocated

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache-hit blocks (removing free ones from the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference per block. Callers pass a request's blocks tail first, so the
        end of a sequence (least likely to be shared) is evicted before its prefix."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: BlockHash, group: int = 0) -> bool:
        """Register a full, computed block of `group` under its hash. If another block
        already holds this hash (two requests computed the same prefix concurrently), keep
        the first. Returns whether the hash is newly findable."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        cached = self._cached_by_group[group]
        if block_hash in cached:
            return False
        block.block_hash = block_hash
        block.group = group
        cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> None:
        for cached in self._cached_by_group:
            for block in cached.values():
                block.block_hash = None
            cached.clear()
        if self.events.enabled:
            self.events.cleared()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached_by_group[block.group][block.block_hash]
            # Routers hear of the first group's blocks only: one event per prefix block.
            if self.events.enabled and block.group == 0:
                self.events.removed(block.block_hash)
            block.block_hash = None

    def check_invariants(self) -> None:
        """free + in use == total; ref counts >= 0; the free queue holds exactly the
        unreferenced blocks; every cached hash maps to the block that carries it."""
        free_ids = set(self._free_queue)
        assert len(free_ids) == len(self._free_queue)
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            assert (block.ref_cnt == 0) == (block.block_id in free_ids), block
        num_used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert num_used + len(free_ids) == self.num_blocks
        for group, cached in enumerate(self._cached_by_group):
            for block_hash, block in cached.items():
                assert block.block_hash == block_hash and block.group == group, block
        assert sum(1 for b in self.blocks if b.block_hash is not None) == sum(
            len(cached) for cached in self._cached_by_group)
