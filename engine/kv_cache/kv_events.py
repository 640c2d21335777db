"""KV-cache events for cache-aware routers: what entered and left the prefix cache.

    BlockStored       full blocks newly findable by hash (one event per request per step:
                      consecutive blocks of one prefix, with the parent of the first)
    BlockRemoved      hashes no longer findable (their block was reallocated)
    AllBlocksCleared  the whole prefix cache was forgotten (reset_prefix_cache)

The recorder sits in the block pool and the KV cache manager, on the step thread. It records
only while enabled (someone watches): disabled, every hook is one attribute test. The step
loop takes each step's events as one KvEventBatch, numbered in order, and sends it to the
serving side (engine.core.messages.CoreKvEvents in the process setting).

These mirror vLLM's KVEventBatch (BlockStored / BlockRemoved / AllBlocksCleared) so a router
written for it maps one to one; the hashes are ours (engine.kv_cache.block_hash,
protoserve.kv_block_hashes), not vLLM's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from engine.kv_cache.block_hash import BlockHash


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[BlockHash, ...]
    # The hash of the block before the first one (None: the first is the prompt's block 0).
    parent_block_hash: BlockHash | None
    # The tokens of every stored block, block_size per block, in order.
    token_ids: tuple[int, ...]
    block_size: int
    # The LoRA adapter whose KV these blocks hold ("" for the base model).
    lora_name: str = ""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """One engine step's events. Sequence numbers count batches from 0 over the core's life,
    with no gaps while recording is on; one is skipped where recording came back on after
    being off (events went unrecorded in between)."""

    sequence_number: int
    timestamp: float  # Unix seconds when the step ended
    events: tuple[KvEvent, ...]


class KvEventRecorder:
    """Collects events between steps; owned by the step thread."""

    def __init__(self) -> None:
        self.enabled = False
        self._pending: list[KvEvent] = []
        # Removals are coalesced into one event per step (evictions come one block at a time).
        self._removed: list[BlockHash] = []
        self._next_sequence_number = 0
        self._was_enabled = False

    def set_enabled(self, enabled: bool) -> None:
        """Turning recording off drops what was not taken yet: nobody is left to read it.
        Turning it back on skips a sequence number, so a reader of the numbers (the replay
        ring, engine/frontend/kv_event_hub.py) sees that events went unrecorded."""
        if enabled and not self.enabled and self._was_enabled:
            self._next_sequence_number += 1
        self._was_enabled = self._was_enabled or enabled
        self.enabled = enabled
        if not enabled:
            self._pending.clear()
            self._removed.clear()

    def stored(self, event: BlockStored) -> None:
        self._flush_removed()
        self._pending.append(event)

    def removed(self, block_hash: BlockHash) -> None:
        self._removed.append(block_hash)

    def cleared(self) -> None:
        # Removals before the clear are subsumed by it.
        self._removed.clear()
        self._pending.append(AllBlocksCleared())

    def take_batch(self) -> KvEventBatch | None:
        """This step's events as the next numbered batch, or None when there are none."""
        self._flush_removed()
        if not self._pending:
            return None
        batch = KvEventBatch(self._next_sequence_number, time.time(), tuple(self._pending))
        self._next_sequence_number += 1
        self._pending.clear()
        return batch

    def _flush_removed(self) -> None:
        # Order matters to a router: a hash removed then stored again in one step must end
        # up stored, so removals are flushed before every store.
        if self._removed:
            self._pending.append(BlockRemoved(tuple(self._removed)))
            self._removed.clear()
