"""KVCacheManager with two KV cache groups, a full-attention one and a windowed one (Gemma 2's
layout): the windowed group's blocks stop growing past the window while the full group keeps
every block, a prefix hit is valid for both groups, and as many full-length requests fit as
the reported maximum concurrency says.

As in test_kv_cache_manager.py the tests play the scheduler's part by hand.
"""
from __future__ import annotations

import pytest
import torch

from engine.core.request import Request
from engine.kv_cache import KVCacheManager
from engine.runner.kv_memory import KVCacheSpec, max_concurrency
from engine.sampling_params import SamplingParams

BS = 4
W = 8
FULL, WINDOW = 0, 1
GROUPS = (None, W)
# The window's W - 1 earlier positions and the newest one touch at most this many blocks.
WINDOW_BLOCKS = -(-(W - 1) // BS) + 1


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(temperature=0.0), max_tokens=1000)


def prefill(kv: KVCacheManager, request: Request) -> int:
    """Admit the request past its prefix hit and compute its prompt; returns the hit blocks."""
    hit = kv.find_prefix_hit(request)
    assert kv.allocate_slots(request, request.num_tokens - hit.num_blocks * BS, hit)
    kv.record_lookup(request, hit)
    request.num_computed_tokens = request.num_tokens
    kv.cache_computed_blocks(request)
    kv.check_invariants()
    kv.check_request(request)
    return hit.num_blocks


def decode(kv: KVCacheManager, request: Request, token: int) -> bool:
    request.append_output_token(token)
    if not kv.allocate_slots(request, 1):
        return False
    request.num_computed_tokens += 1
    kv.cache_computed_blocks(request)
    kv.check_invariants()
    kv.check_request(request)
    return True


def test_windowed_group_stops_growing_while_the_full_group_grows() -> None:
    kv = KVCacheManager(64, BS, group_windows=GROUPS)
    request = make_request("a", list(range(10)))
    prefill(kv, request)
    for step in range(60):
        assert decode(kv, request, 100 + step)
        length = request.num_tokens
        full, window = kv.held_blocks_by_group(request)
        assert full == -(-length // BS)  # every block of its tokens
        assert window <= WINDOW_BLOCKS  # however long it runs
        tables = request.block_tables
        assert len(tables) == 2 and tables[FULL] is request.block_ids
        # The windowed table keeps its indexing: behind the window, the null block.
        first_visible = (length - W) // BS
        assert tables[WINDOW][:first_visible] == [kv.null_block_id] * first_visible
        assert kv.null_block_id not in tables[WINDOW][first_visible:]
        assert kv.null_block_id not in tables[FULL]
    assert kv.num_held_blocks(request) == sum(kv.held_blocks_by_group(request))
    kv.free(request)
    kv.check_invariants()
    assert kv.pool.num_free_blocks == kv.num_blocks


def expected_hit(kv: KVCacheManager, request: Request) -> int:
    """Brute force: the longest k whose blocks the full group holds from 0 and whose window
    (the blocks positions k * BS - W + 1 .. k * BS - 1 touch) the windowed group holds."""
    hashes = request.block_hashes
    for k in range((request.num_tokens - 1) // BS, 0, -1):
        full_ok = all(kv.pool.get_cached_block(h, FULL) for h in hashes[:k])
        first = max(0, k * BS - W + 1) // BS
        window_ok = all(kv.pool.get_cached_block(h, WINDOW) for h in hashes[first:k])
        if full_ok and window_ok:
            return k
    return 0


def run_and_free(kv: KVCacheManager, tokens: list[int], num_new: int) -> Request:
    request = make_request("a", tokens)
    prefill(kv, request)
    for step in range(num_new):
        assert decode(kv, request, 200 + step)
    return request


def test_a_hit_needs_only_the_window_of_the_windowed_group() -> None:
    kv = KVCacheManager(64, BS, group_windows=GROUPS)
    a = run_and_free(kv, list(range(12)), 28)  # 40 tokens: 10 blocks
    a_full, a_window = list(a.block_tables[FULL]), list(a.block_tables[WINDOW])
    kv.free(a)
    # Reuse every free block but 14: A's last 12 (10 full, 2 in the window when it finished)
    # and 2 of its windowed ones given back while it ran; the others, blocks 0-5, are evicted.
    held = kv.pool.allocate(kv.pool.num_free_blocks - 14)
    b = make_request("b", a.all_token_ids + [7, 7])
    kv.find_prefix_hit(b)
    assert kv.pool.get_cached_block(b.block_hashes[5], WINDOW) is None
    hit = prefill(kv, b)
    assert hit == 10 == expected_hit(kv, b)
    assert b.block_tables[FULL][:10] == a_full
    # The windowed group takes only the blocks inside the window of position 40.
    assert b.block_tables[WINDOW][:8] == [kv.null_block_id] * 8
    assert b.block_tables[WINDOW][8:10] == a_window[8:10]
    kv.free(b)
    kv.pool.free(held)
    kv.check_invariants()


def test_new_blocks_never_evict_another_groups_hit_blocks() -> None:
    kv = KVCacheManager(64, BS, group_windows=GROUPS)
    a = run_and_free(kv, list(range(12)), 28)
    a_window = list(a.block_tables[WINDOW])
    kv.free(a)
    # Only A's last 12 blocks stay free, then two more behind them: the windowed group's hit
    # blocks sit at the head of the free queue, where a new block would be taken from.
    held = kv.pool.allocate(kv.pool.num_free_blocks - 12)
    kv.pool.free(held[:2])
    b = make_request("b", a.all_token_ids + [7, 7])
    assert prefill(kv, b) == 10
    assert b.block_tables[WINDOW][8:10] == a_window[8:10]
    full, window = kv.held_tables(b)
    assert not set(full) & set(window)
    kv.free(b)
    kv.pool.free(held[2:])
    kv.check_invariants()


def test_no_hit_where_the_windowed_group_lost_the_window() -> None:
    kv = KVCacheManager(64, BS, group_windows=GROUPS)
    a = run_and_free(kv, list(range(12)), 28)
    kv.free(a)
    # Keep only 10 of A's blocks: full 0-8 and windowed 8. The full group could serve a hit of
    # 9 blocks, but the windowed group lacks the window of every hit point (for 9: blocks 7
    # and 8).
    held = kv.pool.allocate(kv.pool.num_free_blocks - 10)
    b = make_request("b", a.all_token_ids + [7, 7])
    kv.find_prefix_hit(b)
    assert kv.pool.get_cached_block(b.block_hashes[8], FULL) is not None
    assert kv.pool.get_cached_block(b.block_hashes[7], WINDOW) is None
    assert kv.find_prefix_hit(b).num_blocks == 0 == expected_hit(kv, b)
    kv.pool.free(held)


@pytest.mark.parametrize("num_evicted", range(0, 40, 3))
def test_hits_match_the_brute_force_reference(num_evicted: int) -> None:
    kv = KVCacheManager(64, BS, group_windows=GROUPS)
    a = run_and_free(kv, list(range(12)), 28)
    kv.free(a)
    held = kv.pool.allocate(kv.pool.num_free_blocks - 50 + num_evicted)
    b = make_request("b", a.all_token_ids + [7, 7])
    assert kv.find_prefix_hit(b).num_blocks == expected_hit(kv, b)
    kv.pool.free(held)
    kv.check_invariants()


@pytest.mark.parametrize("max_model_len", [24, 64])
def test_as_many_full_length_requests_fit_as_the_reported_concurrency(max_model_len: int) -> None:
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, block_size=BS,
                       dtype=torch.float32, group_windows=GROUPS)
    num_blocks = 70
    concurrency = max_concurrency(spec, num_blocks, max_model_len)
    fitting = int(concurrency)
    assert fitting >= 2
    for num_requests, fits in ((fitting, True), (fitting + 1, False)):
        kv = KVCacheManager(num_blocks, BS, group_windows=GROUPS)
        requests = [make_request(str(i), [i]) for i in range(num_requests)]
        for request in requests:
            prefill(kv, request)
        # In lockstep to the full length: one token each per round.
        ok = True
        for step in range(max_model_len - 1):
            ok = all(decode(kv, request, step) for request in requests)
            if not ok:
                break
        assert ok == fits


def test_a_step_is_allocated_in_every_group_or_in_none() -> None:
    kv = KVCacheManager(9, BS, group_windows=GROUPS)  # 8 usable blocks
    a = make_request("a", list(range(16)))  # 4 blocks in each group: exactly 8
    prefill(kv, a)
    assert kv.pool.num_free_blocks == 0
    b = make_request("b", [1, 2])
    assert not kv.allocate_slots(b, 2)
    assert kv.held_blocks_by_group(b) == [0, 0]
    kv.check_invariants()
    # With every block to itself a request could compute 16 tokens from position 0 (4
    # blocks per group); a longer step is shortened to that.
    assert kv.fit_new_tokens(0, 16) == 16
    assert kv.fit_new_tokens(0, 40) == 16
    # From position 16 on the windowed group needs blocks 2 (the window's start) and up, so
    # (8 + 2) // 2 = 5 table entries per group fit: positions up to 20, 4 more tokens. From
    # 20 not one more token fits (6 full blocks and 3 windowed ones): it can never go on.
    assert kv.fit_new_tokens(16, 40) == 4
    assert kv.fit_new_tokens(20, 1) == 0
