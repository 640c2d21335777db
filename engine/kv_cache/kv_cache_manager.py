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

KV cache groups (engine/kv_cache/groups.py; Gemma 2/3, Qwen2 with max_window_layers): each
group has its own table per request (`request.block_tables`, the first being block_ids) and
its own prefix-cache map in the shared pool. Everything above holds per group: a windowed
group gives back its blocks behind its window, a full group keeps all. A step's blocks are
allocated for every group or for none, and the prefix hit is one length valid for every
group (engine/kv_cache/hybrid_hit.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.block_hash import extend_block_hashes
from engine.kv_cache.block_pool import BlockPool, KVBlock
from engine.kv_cache.hybrid_hit import find_hybrid_hit, first_visible_block
from engine.kv_cache.kv_events import BlockStored
from engine.core.request import Request


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """Cached blocks that cover the first `num_blocks` blocks of a request: the first
    group's, then those of any other KV cache group (None where a windowed group needs no
    block: behind the window of the hit point)."""

    blocks: tuple[KVBlock | None, ...]
    other_groups: tuple[tuple[KVBlock | None, ...], ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def group_blocks(self, group: int) -> tuple[KVBlock | None, ...]:
        if group == 0 or not self.blocks:
            return self.blocks
        return self.other_groups[group - 1]


NO_HIT = PrefixHit(())


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
        group_windows: tuple[int | None, ...] | None = None,
    ) -> None:
        """`num_blocks`: blocks of the runner's cache. `group_windows`: the window of each KV
        cache group (None: full attention); `sliding_window` is shorthand for one group."""
        windows = group_windows if group_windows else (sliding_window,)
        for window in windows:
            if window is None:
                continue
            if isinstance(window, bool) or not isinstance(window, int):
                raise ValueError(f"sliding_window must be an int or None, got {window!r}")
            if window < 1:
                raise ValueError(f"sliding_window must be >= 1 token, got {window}")
        windowed = any(window is not None for window in windows)
        if windowed and num_blocks < 2:
            raise ValueError(
                "with a sliding window the KV cache needs at least 2 blocks (one is the "
                f"null block), got num_blocks={num_blocks}"
            )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.group_windows: tuple[int | None, ...] = tuple(windows)
        self.num_groups = len(windows)
        # The window shared by every group (None: some group attends to everything, or the
        # groups' windows differ).
        self.sliding_window = windows[0] if len(set(windows)) == 1 else None
        self._windowed_groups = [g for g, window in enumerate(windows) if window is not None]
        # With a window the last block of the cache is the null block, outside the pool.
        num_pool_blocks = num_blocks - 1 if windowed else num_blocks
        self.null_block_id: int | None = num_pool_blocks if windowed else None
        self.pool = BlockPool(
            num_pool_blocks, enable_caching=enable_prefix_caching, num_groups=self.num_groups
        )
        # Cumulative counters for the prefix-cache hit rate.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        # Per request and group: how many leading blocks are already published to the prefix
        # cache, so each step only looks at newly filled blocks.
        self._num_published_blocks: dict[str, list[int]] = {}
        # Per request and group (windowed groups): how many leading table entries were given
        # back and now point at the null block.
        self._num_dropped_blocks: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        """Blocks requests can hold (the null block not counted)."""
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def first_visible_block(self, num_computed: int, group: int = 0) -> int:
        """Index of the first block of `group` that a query at position num_computed or
        later can attend to: 0 without a window; with one, the block of num_computed - W + 1."""
        return first_visible_block(num_computed, self.group_windows[group], self.block_size)

    def fit_new_tokens(self, num_computed: int, num_new: int) -> int:
        """How many of `num_new` tokens after `num_computed` one step can compute if the
        request had every block to itself. Without a window: all of them, or 0 when the
        blocks for positions [0, num_computed + num_new) exceed the cache (the request can
        never go on). With windowed groups, only the blocks from each windowed group's first
        visible one on count, and a step that would still need too many computes a shorter
        chunk (a windowed group needs fewer blocks for it); 0 only when not even one token
        fits: the windows, with any full group's blocks, are wider than the cache."""
        visible = sum(self.first_visible_block(num_computed, g) for g in self._windowed_groups)
        # Every group needs the same blocks_needed(end) table entries, less its dropped ones.
        room = (self.num_blocks + visible) // self.num_groups * self.block_size - num_computed
        if room >= num_new:
            return num_new
        return max(room, 0) if self._windowed_groups else 0

    def num_held_blocks(self, request: Request) -> int:
        """Blocks the request really holds, over every group (entries not given back)."""
        return sum(self.held_blocks_by_group(request))

    def held_blocks_by_group(self, request: Request) -> list[int]:
        dropped = self._dropped(request)
        return [len(table) - num for table, num in zip(request.block_tables, dropped)]

    def held_block_ids(self, request: Request) -> list[int]:
        return [i for held in self.held_tables(request) for i in held]

    def held_tables(self, request: Request) -> list[list[int]]:
        """Per group, the block ids the request holds (its table less the given-back ones)."""
        dropped = self._dropped(request)
        return [table[num:] for table, num in zip(request.block_tables, dropped)]

    def find_prefix_hit(self, request: Request) -> PrefixHit:
        """The longest run of cached full blocks at the start of the request's tokens (for
        every group: see hybrid_hit.py). At least one token is always left to compute: the
        step that computes it yields the logits for the next token."""
        if not self.enable_prefix_caching:
            return NO_HIT
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        if self.num_groups > 1:
            groups = find_hybrid_hit(
                self.pool, request.block_hashes[:max_blocks], self.group_windows,
                self.block_size,
            )
            return PrefixHit(groups[0], tuple(groups[1:])) if groups[0] else NO_HIT
        hit: list[KVBlock | None] = []
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
        """Make room for `num_new_tokens` more tokens (after any prefix hit) in every group.
        All or nothing: returns False, changing nothing, when the pool cannot supply the
        blocks; blocks that fell behind a window are given back first either way (no query
        reads them again, and the blocks they free count toward this request's new ones)."""
        num_computed = request.num_computed_tokens + hit.num_blocks * self.block_size
        tables = request.block_tables
        if len(tables) < self.num_groups:
            tables.extend([] for _ in range(self.num_groups - len(tables)))
        for group in self._windowed_groups:
            self._drop_blocks_before(request, group, self.first_visible_block(num_computed, group))
        num_required = self.blocks_needed(num_computed + num_new_tokens)
        if not hit.blocks and min(map(len, tables)) >= num_required:
            return True  # most decode steps: the last block still has room (nothing to do)
        # Per group: hit entries behind the window (not taken: they point at the null block),
        # the hit blocks taken, and the new blocks.
        plans: list[tuple[int, tuple[KVBlock | None, ...], int]] = []
        num_wanted = 0
        for group, table in enumerate(tables):
            hit_blocks = hit.group_blocks(group)
            first_visible = self.first_visible_block(num_computed, group)
            num_skipped = min(max(first_visible - len(table), 0), len(hit_blocks))
            taken = hit_blocks[num_skipped:]
            num_new_blocks = max(num_required - len(table) - len(hit_blocks), 0)
            # Hit blocks sitting in the free queue stop being allocatable once touched.
            num_wanted += num_new_blocks + sum(1 for b in taken if b is not None and b.ref_cnt == 0)
            plans.append((num_skipped, taken, num_new_blocks))
        if num_wanted > self.pool.num_free_blocks:
            return False
        # Every group's hit blocks are taken before any new block is allocated: allocation
        # evicts from the free queue, where another group's hit blocks may still sit.
        for group, (table, (num_skipped, taken, _)) in enumerate(zip(tables, plans)):
            if num_skipped:
                assert self.null_block_id is not None  # only a window skips blocks
                table.extend([self.null_block_id] * num_skipped)
                self._dropped(request)[group] = len(table)
            if taken:
                assert all(b is not None for b in taken), "a hit block inside the window is gone"
                self.pool.touch(taken)  # type: ignore[arg-type]
                table.extend(b.block_id for b in taken)  # type: ignore[union-attr]
        for table, (_, _, num_new_blocks) in zip(tables, plans):
            if num_new_blocks:
                table.extend(b.block_id for b in self.pool.allocate(num_new_blocks))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish the request's full blocks whose KV is computed, so later requests with the
        same prefix skip them. Called after each step that advanced the request."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        # Every group's count moves together (all set below), so the first tells for all.
        published = self._num_published_blocks.get(request.request_id)
        if published is None:
            published = self._num_published_blocks[request.request_id] = [0] * self.num_groups
        elif num_full <= published[0]:
            return  # most decode steps: no block filled up
        dropped = self._dropped(request)
        blocks = self.pool.blocks
        for group, table in enumerate(request.block_tables):
            # Entries given back point at the null block: there is nothing of theirs to publish.
            start = max(published[group], dropped[group])
            published[group] = num_full
            if num_full <= start:
                continue
            self._update_hashes(request)
            # Routers hear of the first group's blocks only (one event per prefix block).
            recording = group == 0 and self.pool.events.enabled
            stored: list[int] = []  # indexes of the blocks newly findable, for the KV events
            for i in range(start, num_full):
                newly_cached = self.pool.cache_block(
                    blocks[table[i]], request.block_hashes[i], group)
                if newly_cached and recording:
                    stored.append(i)
            if stored:
                self._record_stored(request, stored)

    def free_blocks_beyond(self, request: Request, num_tokens: int) -> None:
        """Give back the request's blocks past those positions [0, num_tokens) need: blocks
        that only rejected draft tokens reached (never published: they hold no accepted KV)."""
        blocks = self.pool.blocks
        for table, num_dropped in zip(request.block_tables, self._dropped(request)):
            keep = max(self.blocks_needed(num_tokens), num_dropped)
            if len(table) > keep:
                self.pool.free(blocks[i] for i in reversed(table[keep:]))
                del table[keep:]

    def free(self, request: Request) -> None:
        """Release the request's blocks (cached ones stay findable until evicted): from the
        last position back, every group's block of a position together, so the prefix a later
        hit needs in all groups stays cached the longest."""
        blocks = self.pool.blocks
        tables = request.block_tables
        dropped = self._dropped(request)
        if len(tables) == 1:
            self.pool.free(blocks[i] for i in reversed(tables[0][dropped[0]:]))
        else:
            longest = max(map(len, tables))
            self.pool.free(
                blocks[table[i]]
                for i in range(longest - 1, -1, -1)
                for table, num in zip(tables, dropped)
                if num <= i < len(table)
            )
        for table in tables:
            table.clear()
        self._num_published_blocks.pop(request.request_id, None)
        self._num_dropped_blocks.pop(request.request_id, None)

    def _dropped(self, request: Request) -> list[int]:
        """Per group, the request's leading table entries given back (created on first use)."""
        dropped = self._num_dropped_blocks.get(request.request_id)
        if dropped is None:
            dropped = self._num_dropped_blocks[request.request_id] = [0] * self.num_groups
        return dropped

    def _drop_blocks_before(self, request: Request, group: int, first_visible: int) -> None:
        """Give back the group's blocks with index < first_visible (tail first, as `free`
        does, so the prefix a later hit walks from stays cached the longest)."""
        dropped = self._dropped(request)
        num_dropped = dropped[group]
        block_ids = request.block_tables[group]
        end = min(first_visible, len(block_ids))
        if end <= num_dropped:
            return
        blocks = self.pool.blocks
        self.pool.free(blocks[block_ids[i]] for i in range(end - 1, num_dropped - 1, -1))
        assert self.null_block_id is not None  # only a window drops blocks
        block_ids[num_dropped:end] = [self.null_block_id] * (end - num_dropped)
        dropped[group] = end

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
        """Per group, the request's table: given-back entries are a prefix pointing at the
        null block, none of them visible to its next query; the rest are pool blocks; every
        group's table has the same length."""
        dropped = self._num_dropped_blocks.get(request.request_id, [0] * self.num_groups)
        tables = request.block_tables
        assert len(tables) in (1, self.num_groups), request
        assert len({len(table) for table in tables}) == 1, request
        for group, (table, num_dropped) in enumerate(zip(tables, dropped)):
            assert num_dropped <= len(table), request
            assert all(i == self.null_block_id for i in table[:num_dropped]), request
            assert num_dropped <= self.first_visible_block(request.num_computed_tokens, group)
            assert all(0 <= i < self.pool.num_blocks for i in table[num_dropped:]), request
