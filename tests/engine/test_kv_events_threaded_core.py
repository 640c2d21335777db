"""KV-cache events from a core on a step thread of the serving process (`--engine-core
thread`; the served tests cover the core process): the serving side's hub turns recording on
for its watcher, a request's prompt blocks arrive with the router-side hashes, a reset
arrives as AllBlocksCleared, and recording goes off again when the watcher leaves."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.frontend.served_model import Engine
from engine.generation import GenerationRequest, PromptInput
from engine.kv_cache.kv_events import AllBlocksCleared, BlockStored
from engine.sampling_params import SamplingParams
from protoserve.kv_block_hashes import block_hashes

BLOCK_SIZE = 4
WAIT_S = 60.0


def test_threaded_core_events_reach_a_watcher(tiny_llama_dir: Path) -> None:
    config = EngineConfig(
        model=ModelConfig(str(tiny_llama_dir), dtype="float32", max_model_len=128),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=32), engine_core="thread",
    )
    engine = Engine.load(config)
    prompt = list(range(30, 41))  # 2 full blocks

    async def run() -> None:
        engine.loop.start()
        hub = engine.loop.kv_events
        watcher = hub.subscribe()
        request = GenerationRequest("r", PromptInput(token_ids=prompt),
                                    SamplingParams(max_tokens=1, temperature=0.0),
                                    return_text=False)
        async for _ in engine.loop.generate(request):
            pass
        batch = await asyncio.wait_for(watcher.next_batch(), WAIT_S)
        (stored,) = [e for e in batch.events if isinstance(e, BlockStored)]
        assert list(stored.block_hashes) == block_hashes(prompt, BLOCK_SIZE)
        assert stored.token_ids == tuple(prompt[:8]) and stored.parent_block_hash is None
        engine.loop.reset_prefix_cache()
        cleared = await asyncio.wait_for(watcher.next_batch(), WAIT_S)
        assert cleared.events == (AllBlocksCleared(),)
        assert cleared.sequence_number == batch.sequence_number + 1
        hub.unsubscribe(watcher)

    try:
        asyncio.run(run())
        # Off with the last watcher: the step thread records nothing more.
        events = engine.loop.core.core.kv_cache.pool.events
        for _ in range(100):
            if not events.enabled:
                break
            time.sleep(0.05)
        assert not events.enabled
    finally:
        engine.loop.stop()
