"""Consistency checks of a scheduler's bookkeeping (tests and debugging; never per step)."""
from __future__ import annotations

from collections.abc import Iterable

from engine.core.request import Request, RequestStatus
from engine.kv_cache import KVCacheManager


def check_scheduler_invariants(
    kv_cache: KVCacheManager,
    running: Iterable[Request],
    waiting: Iterable[Request],
    requests: dict[str, Request],
) -> None:
    """Block accounting matches the requests' block tables; no request is in two places."""
    kv_cache.check_invariants()
    running_ids = {r.request_id for r in running}
    waiting_ids = {r.request_id for r in waiting}
    assert not running_ids & waiting_ids
    assert running_ids | waiting_ids == set(requests)
    refs: dict[int, int] = {}
    # A block holds the KV of one KV cache group's layers: no two groups may share it.
    group_of: dict[int, int] = {}
    for request in requests.values():
        kv_cache.check_request(request)
        for block_id in kv_cache.held_block_ids(request):
            refs[block_id] = refs.get(block_id, 0) + 1
        for group, held in enumerate(kv_cache.held_tables(request)):
            for block_id in held:
                assert group_of.setdefault(block_id, group) == group, (block_id, request)
        if request.status == RequestStatus.RUNNING:
            needed = kv_cache.blocks_needed(request.num_computed_tokens)
            assert len(request.block_ids) >= needed, request
    for block in kv_cache.pool.blocks:
        assert block.ref_cnt == refs.get(block.block_id, 0), block
