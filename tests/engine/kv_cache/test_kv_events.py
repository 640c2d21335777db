"""KV-cache events recorded by the cache manager and pool (stored on publish, removed on
reallocation, cleared on reset, nothing while off), checked against the router-side hash
function protoserve.kv_block_hashes, and their fan-out to watchers with a bounded queue."""
from __future__ import annotations

import asyncio

import pytest

from engine.core.loop import SetKvEvents
from engine.core.request import Request
from engine.frontend.kv_event_hub import KvEventHub, WatcherOverflow
from engine.kv_cache import KVCacheManager
from engine.kv_cache.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
)
from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams
from protoserve.kv_block_hashes import block_hashes

BS = 4


def make_request(request_id: str, token_ids: list[int], cache_salt: str = "") -> Request:
    return Request(
        request_id, token_ids, SamplingParams(temperature=0.0), max_tokens=8, cache_salt=cache_salt
    )


def compute(kv: KVCacheManager, request: Request) -> None:
    """The scheduler's part: allocate, 'compute' the whole prompt, publish its blocks."""
    hit = kv.find_prefix_hit(request)
    assert kv.allocate_slots(request, request.num_tokens - hit.num_blocks * BS, hit)
    request.num_computed_tokens = request.num_tokens
    kv.cache_computed_blocks(request)


def events_manager(num_blocks: int = 8) -> KVCacheManager:
    kv = KVCacheManager(num_blocks, BS)
    kv.pool.events.set_enabled(True)
    return kv


def test_nothing_is_recorded_while_off() -> None:
    kv = KVCacheManager(8, BS)
    compute(kv, make_request("a", list(range(9))))
    kv.pool.reset_prefix_cache()
    assert kv.pool.events.take_batch() is None


def test_stored_blocks_carry_the_router_side_hashes_parent_and_tokens() -> None:
    kv = events_manager()
    prompt = list(range(100, 111))  # 2 full blocks and 3 tokens
    compute(kv, make_request("a", prompt, cache_salt="tenant"))
    batch = kv.pool.events.take_batch()
    assert batch is not None and batch.sequence_number == 0
    (stored,) = batch.events
    assert stored == BlockStored(tuple(block_hashes(prompt, BS, "tenant")), None,
                                 tuple(prompt[:8]), BS)
    # A longer prompt sharing the prefix: only its new blocks, chained to the shared ones.
    longer = prompt + [7, 8, 9, 10, 11]
    compute(kv, make_request("b", longer, cache_salt="tenant"))
    (stored,) = kv.pool.events.take_batch().events
    expected = block_hashes(longer, BS, "tenant")
    assert stored.block_hashes == tuple(expected[2:4])
    assert stored.parent_block_hash == expected[1]
    assert stored.token_ids == tuple(longer[8:16])


def test_an_adapters_blocks_are_announced_with_its_name() -> None:
    kv = events_manager()
    request = Request("a", list(range(100, 109)), SamplingParams(temperature=0.0), max_tokens=8,
                      lora=LoRARequest("sql-adapter", 3, "/adapters/sql"))
    compute(kv, request)
    (stored,) = kv.pool.events.take_batch().events
    assert stored.lora_name == "sql-adapter"
    # Its hashes differ from the base model's for the same tokens: never shared.
    assert stored.block_hashes[0] != block_hashes(list(range(100, 109)), BS)[0]


def test_a_block_cached_by_another_request_is_announced_once() -> None:
    kv = events_manager()
    prompt = list(range(9))
    first, second = make_request("a", prompt), make_request("b", prompt)
    # Both allocate before either publishes: the second finds no hit and computes the same.
    for request in (first, second):
        assert kv.allocate_slots(request, request.num_tokens)
        request.num_computed_tokens = request.num_tokens
    kv.cache_computed_blocks(first)
    kv.cache_computed_blocks(second)
    events = kv.pool.events.take_batch().events
    assert [e.block_hashes for e in events] == [tuple(block_hashes(prompt, BS))]


def test_reallocated_blocks_are_removed_and_reset_clears_all() -> None:
    kv = events_manager(num_blocks=3)
    prompt_a = list(range(8))
    a = make_request("a", prompt_a + [99])
    compute(kv, a)
    kv.free(a)
    first = kv.pool.events.take_batch()
    # Another prompt needs all 3 blocks: the two cached ones are reallocated.
    b = make_request("b", list(range(50, 61)))
    compute(kv, b)
    second = kv.pool.events.take_batch()
    assert second.sequence_number == first.sequence_number + 1
    removed, stored = second.events
    assert isinstance(removed, BlockRemoved) and isinstance(stored, BlockStored)
    assert sorted(removed.block_hashes) == sorted(block_hashes(prompt_a, BS))
    kv.pool.reset_prefix_cache()
    assert kv.pool.events.take_batch().events == (AllBlocksCleared(),)
    assert kv.find_prefix_hit(make_request("c", list(range(50, 61)))).num_blocks == 0


def test_turning_off_drops_what_was_not_taken() -> None:
    kv = events_manager()
    compute(kv, make_request("a", list(range(9))))
    kv.pool.events.set_enabled(False)
    kv.pool.events.set_enabled(True)
    assert kv.pool.events.take_batch() is None


def _batch(n: int) -> KvEventBatch:
    return KvEventBatch(n, 0.0, (AllBlocksCleared(),))


def test_hub_turns_recording_on_for_the_first_watcher_and_off_after_the_last() -> None:
    async def run() -> list:
        sent: list = []
        hub = KvEventHub(sent.append)
        hub.bind(asyncio.get_running_loop())
        first, second = hub.subscribe(), hub.subscribe()
        hub.publish(_batch(0))
        assert (await first.next_batch()).sequence_number == 0
        assert (await second.next_batch()).sequence_number == 0
        hub.unsubscribe(first)
        hub.unsubscribe(second)
        hub.unsubscribe(second)  # idempotent
        return sent

    assert asyncio.run(run()) == [SetKvEvents(True), SetKvEvents(False)]


def test_a_watcher_that_falls_behind_is_cut_off_and_others_keep_their_feed() -> None:
    async def run() -> None:
        sent: list = []
        hub = KvEventHub(sent.append, max_pending=2)
        hub.bind(asyncio.get_running_loop())
        slow, fast = hub.subscribe(), hub.subscribe()
        for n in range(4):
            hub.publish(_batch(n))
            await asyncio.sleep(0)  # the hop to the loop
            assert (await fast.next_batch()).sequence_number == n
        # The slow one still gets what was queued before the cut, then the error.
        assert [(await slow.next_batch()).sequence_number for _ in range(2)] == [0, 1]
        with pytest.raises(WatcherOverflow) as overflow:
            await slow.next_batch()
        assert overflow.value.kind.name == "RESOURCE_EXHAUSTED"
        assert hub.num_watchers == 1 and sent == [SetKvEvents(True)]

    asyncio.run(run())
