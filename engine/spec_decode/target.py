"""The target's generation runner, as the proposers that read it (its dtype, device, hidden
states) need it."""
from __future__ import annotations

from engine.runner.model_runner import ModelRunner
from engine.runner.pooling import GenerateAndEmbedRunner


def generation_runner(target: object, method: str) -> ModelRunner:
    """`target`: the engine's runner (a ModelRunner, or one wrapped to embed too)."""
    runner = target.runner if isinstance(target, GenerateAndEmbedRunner) else target
    if not isinstance(runner, ModelRunner):
        raise ValueError(f"speculative config method {method!r} needs a generation runner, "
                         f"got {type(target).__name__}")
    return runner
