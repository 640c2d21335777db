"""KVCacheManager: chained block hashes, prefix hits, all-or-nothing slot allocation,
publishing computed blocks, freeing, and the hit-rate counters.

The tests play the scheduler's part by hand: they set `num_computed_tokens` themselves.
"""
from __future__ import annotations

import pytest

from engine.kv_cache import KVCacheManager
from engine.kv_cache.block_hash import extend_block_hashes, hash_block
from engine.core.request import Request
from engine.sampling_params import SamplingParams

BS = 4  # block size used throughout


def make_request(request_id: str, token_ids: list[int], cache_salt: str = "") -> Request:
    return Request(
        request_id, token_ids, SamplingParams(temperature=0.0), max_tokens=8, cache_salt=cache_salt
    )


def compute(kv: KVCacheManager, request: Request) -> None:
    """Allocate and 'compute' the whole request in one step, then publish its blocks."""
    hit = kv.find_prefix_hit(request)
    assert kv.allocate_slots(request, request.num_tokens - hit.num_blocks * BS, hit)
    kv.record_lookup(request, hit)
    request.num_computed_tokens = request.num_tokens
    kv.cache_computed_blocks(request)
    kv.check_invariants()


# ----- hashing ---------------------------------------------------------------------------


def test_hash_is_deterministic_and_depends_on_every_input() -> None:
    base = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == base
    assert hash_block(None, [1, 2, 3, 5]) != base
    assert hash_block(hash_block(None, [9, 9, 9, 9]), [1, 2, 3, 4]) != base
    assert hash_block(None, [1, 2, 3, 4], salt="t1") != base
    assert hash_block(None, [1, 2, 3, 4], salt="t1") != hash_block(None, [1, 2, 3, 4], salt="t2")


def test_same_block_tokens_after_different_prefix_hash_differently() -> None:
    a, b = [], []
    extend_block_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8], BS)
    extend_block_hashes(b, [0, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(a) == len(b) == 2
    assert a[0] != b[0]
    assert a[1] != b[1]  # block 1 holds the same tokens, but the chain differs


def test_only_full_blocks_are_hashed_and_extension_is_incremental() -> None:
    tokens = list(range(11))
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens[:3], BS)
    assert hashes == []
    extend_block_hashes(hashes, tokens[:6], BS)
    assert len(hashes) == 1
    extend_block_hashes(hashes, tokens, BS)
    assert len(hashes) == 2  # tokens 8..10 are not a full block
    one_shot: list[bytes] = []
    extend_block_hashes(one_shot, tokens, BS)
    assert hashes == one_shot
    # The chain as defined: each hash covers its parent and its own block's tokens.
    assert hashes[0] == hash_block(None, tokens[0:4])
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])


# ----- prefix hits -----------------------------------------------------------------------


def test_prefix_hit_returns_the_longest_run_of_cached_whole_blocks() -> None:
    kv = KVCacheManager(16, BS)
    a = make_request("a", list(range(14)))  # blocks [0-3] [4-7] [8-11] + 2 tokens
    compute(kv, a)
    b = make_request("b", list(range(8)) + [99, 99, 99, 99, 99])  # shares blocks 0 and 1
    hit = kv.find_prefix_hit(b)
    assert [blk.block_id for blk in hit.blocks] == a.block_ids[:2]
    c = make_request("c", [99] + list(range(1, 14)))  # first block differs: nothing after it
    assert kv.find_prefix_hit(c).num_blocks == 0


def test_prompt_of_exact_full_blocks_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(16, BS)
    compute(kv, make_request("a", list(range(16))))
    exact = make_request("b", list(range(12)))  # 3 full blocks, all cached
    assert kv.find_prefix_hit(exact).num_blocks == 2
    one_more = make_request("c", list(range(13)))
    assert kv.find_prefix_hit(one_more).num_blocks == 3
    single = make_request("d", list(range(4)))
    assert kv.find_prefix_hit(single).num_blocks == 0


def test_cache_salt_isolates_tenants() -> None:
    kv = KVCacheManager(16, BS)
    compute(kv, make_request("a", list(range(9)), cache_salt="tenant-a"))
    assert kv.find_prefix_hit(make_request("b", list(range(9)), "tenant-b")).num_blocks == 0
    assert kv.find_prefix_hit(make_request("c", list(range(9)))).num_blocks == 0
    assert kv.find_prefix_hit(make_request("d", list(range(9)), "tenant-a")).num_blocks == 2


def test_prefix_caching_disabled_never_hits() -> None:
    kv = KVCacheManager(16, BS, enable_prefix_caching=False)
    compute(kv, make_request("a", list(range(9))))
    assert all(b.block_hash is None for b in kv.pool.blocks)
    assert kv.find_prefix_hit(make_request("b", list(range(9)))).num_blocks == 0


def test_hit_on_running_request_shares_its_blocks() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(9)))
    compute(kv, a)
    b = make_request("b", list(range(9)))
    compute(kv, b)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [kv.pool.blocks[i].ref_cnt for i in a.block_ids] == [2, 2, 1]
    assert kv.pool.num_free_blocks == 8 - 4


# ----- allocate_slots --------------------------------------------------------------------


def test_allocate_slots_adds_blocks_only_when_needed() -> None:
    kv = KVCacheManager(8, BS)
    r = make_request("r", list(range(10)))
    assert kv.allocate_slots(r, 10)
    kv.check_invariants()
    assert len(r.block_ids) == 3
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 2)  # tokens 10, 11 still fit block 2
    assert len(r.block_ids) == 3
    r.num_computed_tokens = 12
    assert kv.allocate_slots(r, 1)
    kv.check_invariants()
    assert len(r.block_ids) == 4
    assert len(set(r.block_ids)) == 4
    assert kv.pool.num_free_blocks == 4


def test_allocate_slots_is_all_or_nothing() -> None:
    kv = KVCacheManager(4, BS)
    hog = make_request("hog", list(range(4)))
    assert kv.allocate_slots(hog, 4)
    r = make_request("r", list(range(13)))
    assert not kv.allocate_slots(r, 13)  # needs 4 blocks, 3 free
    kv.check_invariants()
    assert r.block_ids == []
    assert kv.pool.num_free_blocks == 3
    assert kv.allocate_slots(r, 12)
    kv.check_invariants()
    assert len(r.block_ids) == 3


def test_failed_allocation_counts_free_hit_blocks_and_leaves_them_alone() -> None:
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(9)))
    compute(kv, a)
    kv.free(a)  # 2 cached blocks + 1 plain block, all free
    kv.check_invariants()
    hog = make_request("hog", [50] * 4)
    assert kv.allocate_slots(hog, 4)  # takes the never-used block first
    b = make_request("b", list(range(8)) + [60] * 8)
    hit = kv.find_prefix_hit(b)
    assert hit.num_blocks == 2
    # 16 tokens need 4 blocks: 2 from the hit + 2 new, but only 3 are free and the two hit
    # blocks are among them.
    assert not kv.allocate_slots(b, 8, hit)
    kv.check_invariants()
    assert b.block_ids == []
    assert all(blk.ref_cnt == 0 for blk in hit.blocks)
    assert kv.pool.num_free_blocks == 3
    assert kv.find_prefix_hit(b).blocks == hit.blocks
    # A smaller step fits: 2 hit blocks + 1 new block.
    assert kv.allocate_slots(b, 4, hit)
    kv.check_invariants()
    assert b.block_ids[:2] == [blk.block_id for blk in hit.blocks]
    assert len(b.block_ids) == 3
    assert kv.pool.num_free_blocks == 0


# ----- publishing and freeing ------------------------------------------------------------


def test_only_computed_full_blocks_are_published() -> None:
    kv = KVCacheManager(8, BS)
    r = make_request("r", list(range(10)))
    assert kv.allocate_slots(r, 10)
    probe = make_request("probe", list(range(10)))
    r.num_computed_tokens = 3
    kv.cache_computed_blocks(r)
    kv.check_invariants()
    assert kv.find_prefix_hit(probe).num_blocks == 0
    r.num_computed_tokens = 6  # block 0 computed, block 1 half
    kv.cache_computed_blocks(r)
    assert [b.block_id for b in kv.find_prefix_hit(probe).blocks] == r.block_ids[:1]
    r.num_computed_tokens = 10  # blocks 0, 1 full; block 2 holds 2 tokens
    kv.cache_computed_blocks(r)
    kv.check_invariants()
    longer = make_request("longer", list(range(12)) + [7])
    assert [b.block_id for b in kv.find_prefix_hit(longer).blocks] == r.block_ids[:2]
    assert kv.pool.blocks[r.block_ids[2]].block_hash is None


def test_output_tokens_extend_the_published_prefix() -> None:
    kv = KVCacheManager(8, BS)
    r = make_request("r", list(range(6)))
    compute(kv, r)
    for token in (6, 7):  # two generated tokens complete block 1
        r.append_output_token(token)
        assert kv.allocate_slots(r, 1)
        r.num_computed_tokens += 1
        kv.cache_computed_blocks(r)
    kv.check_invariants()
    follow_up = make_request("f", list(range(8)) + [0])
    assert [b.block_id for b in kv.find_prefix_hit(follow_up).blocks] == r.block_ids[:2]


def test_free_keeps_cached_blocks_findable_until_evicted() -> None:
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(13)))  # 3 full blocks + 1 token
    compute(kv, a)
    a_blocks = list(a.block_ids)
    kv.free(a)
    kv.check_invariants()
    assert a.block_ids == []
    assert kv.pool.num_free_blocks == 4
    probe = make_request("probe", list(range(13)))
    assert [b.block_id for b in kv.find_prefix_hit(probe).blocks] == a_blocks[:3]
    # Freed tail first: the partial block 3, then block 2, are handed out first, so the
    # prefix shrinks from its end.
    hog = make_request("hog", [50] * 8)
    assert kv.allocate_slots(hog, 8)
    kv.check_invariants()
    assert hog.block_ids == [a_blocks[3], a_blocks[2]]
    assert [b.block_id for b in kv.find_prefix_hit(probe).blocks] == a_blocks[:2]
    other = make_request("other", [60] * 8)
    assert kv.allocate_slots(other, 8)
    assert kv.find_prefix_hit(probe).num_blocks == 0


def test_request_republishes_after_being_freed() -> None:
    kv = KVCacheManager(2, BS)
    r = make_request("r", list(range(8)))
    compute(kv, r)
    kv.free(r)
    hog = make_request("hog", [50] * 8)
    assert kv.allocate_slots(hog, 8)  # evicts both of r's blocks
    kv.free(hog)
    r.num_computed_tokens = 0  # as after a preemption
    assert kv.find_prefix_hit(r).num_blocks == 0
    compute(kv, r)
    probe = make_request("probe", list(range(8)) + [1])
    assert [b.block_id for b in kv.find_prefix_hit(probe).blocks] == r.block_ids


def test_free_of_request_without_blocks_is_harmless() -> None:
    kv = KVCacheManager(2, BS)
    kv.free(make_request("r", [1, 2]))
    kv.check_invariants()
    assert kv.pool.num_free_blocks == 2


# ----- hit rate --------------------------------------------------------------------------


def test_hit_rate_counts_admitted_lookups() -> None:
    kv = KVCacheManager(16, BS)
    assert kv.hit_rate == 0.0
    compute(kv, make_request("a", list(range(10))))  # 10 queried, 0 hit
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (10, 0)
    compute(kv, make_request("b", list(range(10))))  # 10 queried, 2 blocks = 8 hit
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (20, 8)
    assert kv.hit_rate == pytest.approx(8 / 20)
    kv.find_prefix_hit(make_request("c", list(range(10))))  # a lookup alone does not count
    assert kv.num_queried_tokens == 20
