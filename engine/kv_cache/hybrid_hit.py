"""The prefix-cache hit of a model with several KV cache groups (engine/kv_cache/groups.py).

Each group caches its own blocks under the prefix's hashes. A hit of k blocks lets the
request start computing at position p = k * block_size, so every group must still hold what
the queries from p on read:

    full group       blocks 0 .. k-1 (all of them)
    window W group   blocks from the one holding p - W + 1 to k-1 (those behind the window of
                     p are never read again: not needed, and not taken)

k starts as the longest run the full groups hold from block 0 (or every block asked for);
each windowed group then lowers it to the largest k' <= k whose window blocks it holds,
until no group lowers it. A windowed group may thus serve a hit whose early blocks it has
already given back and the pool has reused.
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.kv_cache.block_hash import BlockHash
from engine.kv_cache.block_pool import BlockPool, KVBlock


def first_visible_block(num_computed: int, window: int | None, block_size: int) -> int:
    """Index of the first block a query at position num_computed or later can attend to."""
    if window is None:
        return 0
    return max(0, num_computed - window + 1) // block_size


def find_hybrid_hit(
    pool: BlockPool, hashes: Sequence[BlockHash], windows: Sequence[int | None], block_size: int
) -> list[tuple[KVBlock | None, ...]]:
    """Per group, the hit's blocks (all groups the same length k; None for the blocks a
    windowed group does not need). `hashes`: the request's first blocks' hashes, as many as a
    hit may cover."""
    num_hit = len(hashes)
    found: list[list[KVBlock | None]] = []
    for group, window in enumerate(windows):
        if window is None:
            blocks: list[KVBlock | None] = []
            for block_hash in hashes[:num_hit]:
                block = pool.get_cached_block(block_hash, group)
                if block is None:
                    break
                blocks.append(block)
            num_hit = len(blocks)
        else:
            blocks = [pool.get_cached_block(h, group) for h in hashes]
        found.append(blocks)
    lowered = True
    while lowered and num_hit:
        lowered = False
        for group, window in enumerate(windows):
            if window is None:
                continue  # holds every block below any k it allowed before
            k = _window_hit(found[group], num_hit, window, block_size)
            if k < num_hit:
                num_hit, lowered = k, True
    hit: list[tuple[KVBlock | None, ...]] = []
    for group, window in enumerate(windows):
        first = first_visible_block(num_hit * block_size, window, block_size)
        hit.append((None,) * first + tuple(found[group][first:num_hit]))
    return hit


def _window_hit(found: list[KVBlock | None], limit: int, window: int, block_size: int) -> int:
    """The largest k <= limit such that blocks [first visible at k * block_size, k) are
    all cached (0 always qualifies: nothing to read)."""
    for k in range(limit, 0, -1):
        first = first_visible_block(k * block_size, window, block_size)
        if all(block is not None for block in found[first:k]):
            return k
    return 0
