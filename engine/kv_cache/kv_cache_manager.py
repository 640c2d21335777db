"""Request-level KV cache API over the block pool; the only writer of `request.block_ids`
and `request.block_hashes`.

Token regions of a request when the scheduler asks for slots (block size 4 shown):

    | b0      | b1      | b2      | b3 ...
    |x x x x  |x x x x  |x x n n  |n n
     <-- num_computed_tokens -->  <new>      new = tokens computed this step
     prefix hit blocks are a whole-block prefix of the computed region

`allocate_slots` guarantees blocks for every token up to num_computed + num_new.

Sliding window (every layer windowed, largest window W): the next query, at position
num_computed, sees keys from num_computed - W + 1 on, and later queries see even less, so the
blocks wholly before that position are never read again. `allocate_slots` gives them back to
the pool; their table entries then point at the null block, so the table keeps its indexing
(position p -> block_ids[p // block_size]) and the kernels, which read no block outside the
window, never look at them (block size 4, W = 6, num_computed = 13):

    block_ids:   [ null | null | b2      | b3 ]
    positions:     0-3    4-7    8 9 10 11  12 13      the query at 13 sees 8..13
                   given back    ^ first visible block = (13 - 6 + 1) // 4 = 2

The null block is the cache's last block: never handed out, never written, all zeros. A
request thus holds at most ceil(W / block_size) + 1 blocks while it decodes, however long it
runs. A prefix hit walks from block 0 and stops at the first block that is gone, so every
block it returns still holds its KV; those behind the window are not even taken.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.block_hash import extend_block_hashes
from engine.kv_cache.block_pool import BlockPool, KVBlock
from engine.kv_cache.kv_events import BlockStored
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
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        """`num_blocks`: blocks of the runner's cache. `sliding_window`: the largest window
        of a model whose every layer is windowed (None otherwise: all blocks are kept)."""
        if sliding_window is not None:
            if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
                raise ValueError(f"sliding_window must be an int or None, got {sliding_window!r}")
            if sliding_window < 1:
                raise ValueError(f"sliding_window must be >= 1 token, got {sliding_window}")
            if num_blocks < 2:
                raise ValueError(
                    "with a sliding window the KV cache needs at least 2 blocks (one is the "
                    f"null block), got num_blocks={num_blocks}"
                )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        # With a window the last block of the cache is the null block, outside the pool.
        num_pool_blocks = num_blocks if sliding_window is None else num_blocks - 1
        self.null_block_id: int | None = None if sliding_window is None else num_pool_blocks
        self.pool = BlockPool(num_pool_blocks, enable_caching=enable_prefix_caching)
        # Cumulative counters for the prefix-cache hit rate.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        # Per request: how many leading blocks are already published to the prefix cache, so
        # each step only looks at newly filled blocks.
        self._num_published_blocks: dict[str, int] = {}
        # Per request (windowed models): how many leading table entries were given back and
        # now point at the null block.
        self._num_dropped_blocks: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        """Blocks requests can hold (the null block not counted)."""
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def first_visible_block(self, num_computed: int) -> int:
        """Index of the first block that a query at position num_computed or later can
        attend to: 0 without a window; with one, the block of num_computed - W + 1."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed - self.sliding_window + 1) // self.block_size

    def fit_new_tokens(self, num_computed: int, num_new: int) -> int:
        """How many of `num_new` tokens after `num_computed` one step can compute if the
        request had every block to itself. Without a window: all of them, or 0 when the
        blocks for positions [0, num_computed + num_new) exceed the cache (the request can
        never go on). With one, only the blocks from the first visible one on count, and a
        step that would still need too many computes a shorter chunk (0 only when not even
        one token fits: the window itself is wider than the cache)."""
        room = (self.first_visible_block(num_computed) + self.num_blocks) * self.block_size
        room -= num_computed
        if room >= num_new:
            return num_new
        return max(room, 0) if self.sliding_window is not None else 0

    def num_held_blocks(self, request: Request) -> int:
        """Blocks the request really holds (its table entries not given back)."""
        return len(request.block_ids) - self._num_dropped_blocks.get(request.request_id, 0)

    def held_block_ids(self, request: Request) -> list[int]:
        return request.block_ids[self._num_dropped_blocks.get(request.request_id, 0) :]

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
        returns False, changing nothing, when the pool cannot supply the blocks; blocks that
        fell behind the window are given back first either way (no query reads them again,
        and the blocks they free count toward this request's new ones)."""
        num_computed = request.num_computed_tokens + hit.num_blocks * self.block_size
        first_visible = self.first_visible_block(num_computed)
        if self.sliding_window is not None:
            self._drop_blocks_before(request, first_visible)
        num_required = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = num_required - len(request.block_ids) - hit.num_blocks
        if num_new_blocks <= 0 and not hit.blocks:
            return True  # most decode steps: the last block still has room (nothing to do)
        # Hit blocks behind the window are not taken: their entries point at the null block.
        num_hit_skipped = min(max(first_visible - len(request.block_ids), 0), hit.num_blocks)
        taken = hit.blocks[num_hit_skipped:]
        # Hit blocks sitting in the free queue stop being allocatable once touched.
        num_hit_free = sum(1 for b in taken if b.ref_cnt == 0)
        if num_new_blocks + num_hit_free > self.pool.num_free_blocks:
            return False
        if num_hit_skipped:
            assert self.null_block_id is not None  # only a window skips blocks
            request.block_ids.extend([self.null_block_id] * num_hit_skipped)
            self._num_dropped_blocks[request.request_id] = len(request.block_ids)
        if taken:
            self.pool.touch(taken)
            request.block_ids.extend(b.block_id for b in taken)
        if num_new_blocks > 0:
            request.block_ids.extend(b.block_id for b in self.pool.allocate(num_new_blocks))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish the request's full blocks whose KV is computed, so later requests with the
        same prefix skip them. Called after each step that advanced the request."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        # Entries given back point at the null block: there is nothing of theirs to publish.
        start = max(
            self._num_published_blocks.get(request.request_id, 0),
            self._num_dropped_blocks.get(request.request_id, 0),
        )
        if num_full <= start:
            return
        self._update_hashes(request)
        blocks = self.pool.blocks
        recording = self.pool.events.enabled
        stored: list[int] = []  # indexes of the blocks newly findable, for the KV events
        for i in range(start, num_full):
            newly_cached = self.pool.cache_block(blocks[request.block_ids[i]],
                                                 request.block_hashes[i])
            if newly_cached and recording:
                stored.append(i)
        self._num_published_blocks[request.request_id] = num_full
        if stored:
            self._record_stored(request, stored)

    def free_blocks_beyond(self, request: Request, num_tokens: int) -> None:
        """Give back the request's blocks past those positions [0, num_tokens) need: blocks
        that only rejected draft tokens reached (never published: they hold no accepted KV)."""
        num_dropped = self._num_dropped_blocks.get(request.request_id, 0)
        keep = max(self.blocks_needed(num_tokens), num_dropped)
        if len(request.block_ids) <= keep:
            return
        blocks = self.pool.blocks
        self.pool.free(blocks[i] for i in reversed(request.block_ids[keep:]))
        del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Release the request's blocks (cached ones stay findable until evicted)."""
        blocks = self.pool.blocks
        self.pool.free(blocks[i] for i in reversed(self.held_block_ids(request)))
        request.block_ids.clear()
        self._num_published_blocks.pop(request.request_id, None)
        self._num_dropped_blocks.pop(request.request_id, None)

    def _drop_blocks_before(self, request: Request, first_visible: int) -> None:
        """Give back the request's blocks with index < first_visible (tail first, as
        `free` does, so the prefix a later hit walks from stays cached the longest)."""
        num_dropped = self._num_dropped_blocks.get(request.request_id, 0)
        end = min(first_visible, len(request.block_ids))
        if end <= num_dropped:
            return
        blocks = self.pool.blocks
        block_ids = request.block_ids
        self.pool.free(blocks[block_ids[i]] for i in range(end - 1, num_dropped - 1, -1))
        assert self.null_block_id is not None  # only a window drops blocks
        block_ids[num_dropped:end] = [self.null_block_id] * (end - num_dropped)
        self._num_dropped_blocks[request.request_id] = end

    def _record_stored(self, request: Request, stored: list[int]) -> None:
        """One BlockStored per run of consecutive block indexes (a block another request
        already cached breaks a run: its hash was announced then)."""
        hashes, size = request.block_hashes, self.block_size
        runs: list[list[int]] = []
        for i in stored:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            first, end = run[0], run[-1] + 1
            self.pool.events.stored(BlockStored(
                block_hashes=tuple(hashes[first:end]),
                parent_block_hash=hashes[first - 1] if first else None,
                token_ids=tuple(request.all_token_ids[first * size : end * size]),
                block_size=size,
                lora_name=request.lora.name if request.lora is not None else "",
            ))

    def _update_hashes(self, request: Request) -> None:
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt,
            request.lora_id,
        )

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        if self.null_block_id is not None:
            assert self.null_block_id == self.pool.num_blocks  # outside the pool's ids

    def check_request(self, request: Request) -> None:
        """The request's table: given-back entries are a prefix pointing at the null block,
        none of them visible to its next query; the rest are pool blocks."""
        num_dropped = self._num_dropped_blocks.get(request.request_id, 0)
        assert num_dropped <= len(request.block_ids), request
        assert all(i == self.null_block_id for i in request.block_ids[:num_dropped]), request
        assert num_dropped <= self.first_visible_block(request.num_computed_tokens), request
        assert all(0 <= i < self.pool.num_blocks for i in self.held_block_ids(request)), request
