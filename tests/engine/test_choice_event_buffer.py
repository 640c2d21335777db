"""A request's n choices share one event queue, and its slow-consumer bound is per choice: a
reader that takes a moment before reading a large-n answer is not cut off for being handed n
choices at once (beyond the bound per choice it is: a stalled client's memory stays bounded)."""
from __future__ import annotations

import asyncio
from pathlib import Path

from engine.config import EngineConfig, ModelConfig
from engine.core.request import FinishReason
from engine.frontend.served_model import Engine
from engine.generation import GenerationFinished, GenerationRequest, PromptInput
from engine.sampling_params import SamplingParams

NUM_CHOICES, MAX_TOKENS = 8, 300  # 2,400 token events: more than one choice's 2,048


def test_many_choices_may_each_buffer_while_the_reader_waits(tiny_llama_dir: Path) -> None:
    config = EngineConfig(
        model=ModelConfig(str(tiny_llama_dir), dtype="float32", max_model_len=512),
        engine_core="thread",
    )
    engine = Engine.load(config)

    async def run() -> list[GenerationFinished]:
        engine.loop.start()
        request = GenerationRequest(
            "many", PromptInput(token_ids=[5, 6, 7]),
            SamplingParams(n=NUM_CHOICES, max_tokens=MAX_TOKENS, ignore_eos=True,
                           temperature=1.0, seed=1),
            return_text=False,
        )
        events = engine.loop.generate(request)
        await anext(events)  # started: every choice is running
        # Read nothing until the engine has handed over every choice's last event.
        while engine.loop.num_running_choices("many"):
            await asyncio.sleep(0.05)
        return [event async for event in events if isinstance(event, GenerationFinished)]

    try:
        finished = asyncio.run(run())
    finally:
        engine.stop()
    assert sorted(f.index for f in finished) == list(range(NUM_CHOICES))
    assert {f.reason for f in finished} == {FinishReason.LENGTH}
    assert {f.num_output_tokens for f in finished} == {MAX_TOKENS}
