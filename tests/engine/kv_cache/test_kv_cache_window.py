"""KVCacheManager with a sliding window: blocks behind every query's window go back to the
pool while the request runs, the block table keeps its indexing through the null block, and
prefix hits stay exact.

As in test_kv_cache_manager.py the tests play the scheduler's part by hand.
"""
from __future__ import annotations

import pytest

from engine.kv_cache import KVCacheManager
from engine.core.request import Request
from engine.sampling_params import SamplingParams

BS = 4
W = 8
# Held while decoding: the window's W positions plus the new one touch at most this many.
STEADY_BLOCKS = -(-W // BS) + 1


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(temperature=0.0), max_tokens=1000)


def prefill(kv: KVCacheManager, request: Request) -> None:
    hit = kv.find_prefix_hit(request)
    num_computed = hit.num_blocks * BS
    assert kv.allocate_slots(request, request.num_tokens - num_computed, hit)
    kv.record_lookup(request, hit)
    request.num_computed_tokens = request.num_tokens
    kv.cache_computed_blocks(request)
    kv.check_invariants()
    kv.check_request(request)


def decode(kv: KVCacheManager, request: Request, token: int) -> None:
    """One generated token: it is appended, then computed by the next step."""
    request.append_output_token(token)
    assert kv.allocate_slots(request, 1)
    request.num_computed_tokens += 1
    kv.cache_computed_blocks(request)
    kv.check_invariants()
    kv.check_request(request)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": True}, "sliding_window"),
        ({"sliding_window": 8.0}, "sliding_window"),
        ({"sliding_window": 8, "num_blocks": 1}, "num_blocks"),
    ],
)
def test_bad_window_settings_name_the_setting(kwargs: dict, field: str) -> None:
    args = {"num_blocks": 16, "block_size": BS, **kwargs}
    with pytest.raises(ValueError, match=field):
        KVCacheManager(**args)


def test_the_null_block_is_the_last_block_and_outside_the_pool() -> None:
    kv = KVCacheManager(16, BS, sliding_window=W)
    assert kv.null_block_id == 15
    assert kv.num_blocks == kv.pool.num_blocks == 15
    plain = KVCacheManager(16, BS)
    assert plain.null_block_id is None and plain.num_blocks == 16


def test_first_visible_block_follows_the_next_query() -> None:
    kv = KVCacheManager(16, BS, sliding_window=W)
    # The query at position p sees p - W + 1 .. p.
    assert [kv.first_visible_block(c) for c in (0, 7, 10, 11, 12, 13, 20)] == [0, 0, 0, 1, 1, 1, 3]
    assert KVCacheManager(16, BS).first_visible_block(100) == 0


def test_fit_new_tokens() -> None:
    plain = KVCacheManager(4, BS)  # 16 slots
    assert plain.fit_new_tokens(0, 16) == 16
    assert plain.fit_new_tokens(0, 17) == 0
    assert plain.fit_new_tokens(15, 2) == 0
    kv = KVCacheManager(5, BS, sliding_window=W)  # 4 usable blocks
    assert kv.fit_new_tokens(0, 16) == 16
    assert kv.fit_new_tokens(0, 40) == 16  # a shorter chunk, not the end
    # At 20 the window starts in block 3: blocks 3..6 can hold positions up to 27.
    assert kv.fit_new_tokens(20, 40) == 8
    assert kv.fit_new_tokens(1000, 1) == 1
    tiny = KVCacheManager(3, BS, sliding_window=W)  # 2 usable blocks: the window needs 3
    assert tiny.fit_new_tokens(0, 8) == 8
    assert tiny.fit_new_tokens(15, 1) == 1  # positions 8..15: blocks 2 and 3 exactly
    assert tiny.fit_new_tokens(13, 1) == 0  # positions 6..13 touch 3 blocks


def test_decoding_holds_a_bounded_number_of_blocks() -> None:
    windowed = KVCacheManager(32, BS, sliding_window=W)
    plain = KVCacheManager(32, BS)
    a, b = make_request("a", list(range(6))), make_request("b", list(range(6)))
    prefill(windowed, a)
    prefill(plain, b)
    for i in range(80):
        decode(windowed, a, 100 + i)
        decode(plain, b, 100 + i)
        assert windowed.num_held_blocks(a) <= STEADY_BLOCKS
        assert windowed.pool.num_free_blocks == windowed.num_blocks - windowed.num_held_blocks(a)
        # The table keeps its indexing: one entry per block of the sequence so far.
        assert len(a.block_ids) == windowed.blocks_needed(a.num_computed_tokens)
        # Given back at the last allocation: the blocks before the window of the query
        # computed then, at num_computed - 1.
        first = windowed.first_visible_block(a.num_computed_tokens - 1)
        assert a.block_ids[:first] == [windowed.null_block_id] * first
        assert a.block_ids[first:] == windowed.held_block_ids(a)
    assert plain.num_held_blocks(b) == plain.blocks_needed(b.num_computed_tokens) == 22
    windowed.free(a)
    windowed.check_invariants()
    assert windowed.pool.num_free_blocks == windowed.num_blocks
    assert all(block.ref_cnt == 0 for block in windowed.pool.blocks)


def test_given_back_blocks_serve_other_requests() -> None:
    kv = KVCacheManager(5, BS, sliding_window=W)  # 4 usable blocks
    a = make_request("a", list(range(8)))
    prefill(kv, a)
    first_blocks = list(a.block_ids)
    for i in range(8):  # positions 8..15: blocks 0 and 1 fall behind the window
        decode(kv, a, 100 + i)
    assert a.block_ids[:2] == [kv.null_block_id] * 2
    assert kv.num_held_blocks(a) == 2 and kv.pool.num_free_blocks == 2
    # Without the give-back a would hold all 4 blocks and b could not start.
    b = make_request("b", [50] * 8)
    assert kv.allocate_slots(b, 8)
    assert sorted(b.block_ids) == sorted(first_blocks)
    kv.check_invariants()
    kv.check_request(a)
    kv.check_request(b)
    assert kv.pool.num_free_blocks == 0


def test_failed_allocation_still_gives_back_blocks_behind_the_window() -> None:
    kv = KVCacheManager(4, BS, sliding_window=W)  # 3 usable blocks
    a = make_request("a", list(range(12)))
    prefill(kv, a)  # blocks 0..2, all of the pool
    a.append_output_token(7)
    # Position 12 needs block 3; the query at 12 sees from 5 on, so block 0 goes back first
    # and its block serves the new one.
    assert kv.allocate_slots(a, 1)
    assert kv.num_held_blocks(a) == 3 and a.block_ids[0] == kv.null_block_id
    hog = make_request("hog", [1] * 4)
    assert not kv.allocate_slots(hog, 4)  # nothing free: nothing changes for hog
    assert hog.block_ids == []
    kv.check_invariants()


def test_hashed_blocks_given_back_stay_findable_and_a_hit_takes_only_the_window() -> None:
    kv = KVCacheManager(32, BS, sliding_window=W)
    a = make_request("a", list(range(12)))  # 3 full blocks, published when computed
    prefill(kv, a)
    a_blocks = list(a.block_ids)
    for i in range(10):
        decode(kv, a, 100 + i)
    assert a.block_ids[:2] == [kv.null_block_id] * 2  # blocks 0, 1 given back ...
    assert all(kv.pool.blocks[i].ref_cnt == 0 for i in a_blocks[:2])
    probe_tokens = a.all_token_ids[:20] + [7]
    probe = make_request("probe", probe_tokens)
    hit = kv.find_prefix_hit(probe)
    # ... but still cached: the hit walks from block 0 over a's 5 full blocks.
    assert [blk.block_id for blk in hit.blocks] == a_blocks[:3] + a.block_ids[3:5]
    free_before = kv.pool.num_free_blocks
    assert kv.allocate_slots(probe, 1, hit)
    kv.record_lookup(probe, hit)
    probe.num_computed_tokens = 20
    kv.check_invariants()
    kv.check_request(probe)
    # The query at 20 sees from 13 on: blocks 0..2 are not taken, 3 and 4 are shared with a,
    # and one new block holds position 20.
    assert probe.block_ids[:3] == [kv.null_block_id] * 3
    assert probe.block_ids[3:5] == a.block_ids[3:5]
    assert [kv.pool.blocks[i].ref_cnt for i in a.block_ids[3:5]] == [2, 2]
    assert all(kv.pool.blocks[i].ref_cnt == 0 for i in a_blocks[:3])
    assert kv.pool.num_free_blocks == free_before - 1
    kv.cache_computed_blocks(probe)  # publishes nothing of the null entries
    assert kv.pool.get_cached_block(hit.blocks[0].block_hash) is hit.blocks[0]
    kv.free(probe)
    kv.free(a)
    kv.check_invariants()
    assert kv.pool.num_free_blocks == kv.num_blocks


def test_a_hit_stops_at_the_first_evicted_block() -> None:
    kv = KVCacheManager(5, BS, sliding_window=W)  # 4 usable blocks
    a = make_request("a", list(range(8)))
    prefill(kv, a)
    a_blocks = list(a.block_ids)
    for i in range(8):
        decode(kv, a, 100 + i)  # block 0 given back at position 11, block 1 at 15
    probe = make_request("probe", a.all_token_ids[:12] + [7])
    assert kv.find_prefix_hit(probe).num_blocks == 3
    hog = make_request("hog", [50] * 4)
    assert kv.allocate_slots(hog, 4)  # evicts the block given back first: a's block 0
    assert hog.block_ids == [a_blocks[0]]
    # Blocks 1 and 2 are still cached, but a hit starts at block 0: none at all.
    assert kv.pool.get_cached_block(probe.block_hashes[1]) is not None
    assert kv.find_prefix_hit(probe).num_blocks == 0
    kv.check_invariants()
