"""The runner of a model served for embeddings (`--task embed`): weights and a pooling
executor, no KV cache and no sampler."""
from __future__ import annotations

from engine.core.batch import ScheduledBatch
from engine.config import ModelConfig
from engine.models.loader import LoadedModel, load_model
from engine.core.outputs import ModelRunnerOutput
from engine.runner.pooling import PoolingExecutor, resolve_pooling_type


class EmbeddingRunner:
    # The scheduler's KV pool needs at least one block; embedding requests never take any.
    num_blocks = 1
    kv_group_windows: tuple[int | None, ...] = (None,)
    task = "embed"

    def __init__(self, model_config: ModelConfig, *, attention_backend: str = "torch") -> None:
        self.loaded: LoadedModel = load_model(model_config, attention_backend=attention_backend)
        self.pooling = PoolingExecutor(
            self.loaded, resolve_pooling_type(model_config.pooling_type, self.loaded)
        )

    def execute(self, batch: ScheduledBatch) -> ModelRunnerOutput:
        if batch.requests:
            # The servers reject generation for embedding models before it gets here.
            raise RuntimeError("an embedding model was scheduled generation requests")
        return ModelRunnerOutput(
            request_ids=[], sampled_token_ids=[], embeddings=self.pooling.execute(batch.pooling)
        )

