"""Request-level KV cache API over the block pool; the only writer of `request.block_ids`
and `request.block_hashes`.

Token regions of a request when the scheduler asks for slots (block size 4 shown):

    | b0      | b1      | b2      | b3 ...
    |x x x x  |x x x x  |x x n n  |n n
     <-- num_computed_tokens -->  <new>      new = tokens computed this step
     prefix hit blocks are a whole-block prefix of the computed region

`allocate_slots` guarantees blocks for every token up to num_computed + num_new.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.block_hash import extend_block_hashes
from engine.kv_cache.block_pool import BlockPool, KVBlock
from engine.core.request import Request


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """Cached blocks that cover the first `num_tokens` tokens of a request."""

    blocks: tuple[KVBlock, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


NO_HIT = PrefixHit(())


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        # Cumulative counters for the prefix-cache hit rate.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        # Per request: how many leading blocks are already published to the prefix cache, so
        # each step only looks at newly filled blocks.
        self._num_published_blocks: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix_hit(self, request: Request) -> PrefixHit:
        """The longest run of cached full blocks at the start of the request's tokens. At
        least one token is always left to compute: the step that computes it yields the
        logits for the next token."""
        if not self.enable_prefix_caching:
            return NO_HIT
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hit.append(block)
        return PrefixHit(tuple(hit))

    def record_lookup(self, request: Request, hit: PrefixHit) -> None:
        """Count one admitted lookup toward the hit rate (failed admissions retry and must
        not count twice)."""
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += hit.num_blocks * self.block_size

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """Make room for `num_new_tokens` more tokens (after any prefix hit). All or nothing:
        returns False, changing nothing, when the pool cannot supply the blocks."""
        num_computed = request.num_computed_tokens + hit.num_blocks * self.block_size
        num_required = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = num_required - len(request.block_ids) - hit.num_blocks
        if num_new_blocks <= 0 and not hit.blocks:
            return True  # most decode steps: the last block still has room (nothing to do)
        # Hit blocks sitting in the free queue stop being allocatable once touched.
        num_hit_free = sum(1 for b in hit.blocks if b.ref_cnt == 0)
        if num_new_blocks + num_hit_free > self.pool.num_free_blocks:
            return False
        if hit.blocks:
            self.pool.touch(hit.blocks)
            request.block_ids.extend(b.block_id for b in hit.blocks)
        if num_new_blocks > 0:
            request.block_ids.extend(b.block_id for b in self.pool.allocate(num_new_blocks))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish the request's full blocks whose KV is computed, so later requests with the
        same prefix skip them. Called after each step that advanced the request."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_published_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(request)
        blocks = self.pool.blocks
        for i in range(start, num_full):
            self.pool.cache_block(blocks[request.block_ids[i]], request.block_hashes[i])
        self._num_published_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks (cached ones stay findable until evicted)."""
        blocks = self.pool.blocks
        self.pool.free(blocks[i] for i in reversed(request.block_ids))
        request.block_ids.clear()
        self._num_published_blocks.pop(request.request_id, None)

    def _update_hashes(self, request: Request) -> None:
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt
        )

    def check_invariants(self) -> None:
        self.pool.check_invariants()
