"""Embedding requests: one forward over whole sequences, then pooling and post-processing.

    jobs:   [ a a a | b b | c c c c ]          every sequence complete (no chunking)
    hidden: [T, H] final hidden states  ->  pool per sequence (mean | cls | last)  ->  [N, H]
            -> keep the first `dimensions` values -> L2-normalise (per request)

Encoders run their own bidirectional forward. Decoders run the ordinary paged-attention
forward (causal) over a scratch KV cache sized for this batch and dropped afterwards, so
embedding requests never take blocks from the generation cache, never enter the prefix cache,
and need no attention code of their own.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch.nn import functional as F

from engine.core.batch import ScheduledBatch, ScheduledPooling, ScheduledRequest
from engine.models.loader import LoadedModel
from engine.core.outputs import ModelRunnerOutput
from engine.pooling_params import PoolingParams
from engine.runner.input_prep import StepInputs, prepare_inputs
from engine.runner.kv_memory import KVCacheSpec, allocate_kv_caches
from engine.sampling_params import SamplingParams

_SCRATCH_BLOCK_SIZE = 16


def pool_hidden(hidden: torch.Tensor, seq_lens: list[int], pooling_type: str) -> torch.Tensor:
    """hidden [T, H] of sequences laid end to end -> float32 [N, H], one row per sequence."""
    hidden = hidden.float()
    lens = torch.tensor(seq_lens, device=hidden.device)
    ends = torch.cumsum(lens, 0)
    if pooling_type == "cls":
        return hidden.index_select(0, ends - lens)
    if pooling_type == "last":
        return hidden.index_select(0, ends - 1)
    if pooling_type == "mean":
        segment = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)
        sums = torch.zeros(len(seq_lens), hidden.shape[1], device=hidden.device)
        sums.index_add_(0, segment, hidden)
        return sums / lens[:, None].float()
    raise ValueError(f"unknown pooling type {pooling_type!r}")


def finish_vector(vector: torch.Tensor, params: PoolingParams) -> list[float]:
    """Truncate (Matryoshka-style: the leading dimensions), then normalise what is left."""
    if params.dimensions is not None:
        vector = vector[: params.dimensions]
    if params.normalize:
        vector = F.normalize(vector, p=2.0, dim=-1)
    return vector.tolist()


def resolve_pooling_type(requested: str, loaded: LoadedModel) -> str:
    """'auto': what the sentence-transformers config says, else CLS for encoders (BERT's
    classification token) and the last token for decoders (the only position that has
    seen the whole sequence under causal attention)."""
    if requested != "auto":
        return requested
    if loaded.sentence_transformers.pooling_type is not None:
        return loaded.sentence_transformers.pooling_type
    return "last" if loaded.is_generative else "cls"


class PoolingExecutor:
    """Runs the embedding requests of one batch on a loaded model (encoder or decoder)."""

    def __init__(self, loaded: LoadedModel, pooling_type: str) -> None:
        self.loaded = loaded
        self.pooling_type = pooling_type
        # Tensor-parallel rank 0: sends each scratch forward's inputs to the other ranks
        # (inputs, scratch blocks, block size), which run it alongside on a scratch cache.
        self.before_forward: Callable[[StepInputs, int, int], None] | None = None
        self._kv_spec = KVCacheSpec(
            num_layers=loaded.num_layers,
            num_kv_heads=loaded.num_kv_heads,
            head_dim=loaded.head_dim,
            block_size=_SCRATCH_BLOCK_SIZE,
            dtype=loaded.dtype,
        )

    def execute(self, jobs: list[ScheduledPooling]) -> dict[str, list[float]]:
        if not jobs:
            return {}
        seq_lens = [len(job.token_ids) for job in jobs]
        with torch.inference_mode():
            hidden = self._forward(jobs, seq_lens)
            classify = getattr(self.loaded.model, "classify", None)
            # Sequence classifiers answer their head's logits in place of a pooled vector.
            pooled = (
                classify(hidden, seq_lens)
                if classify is not None
                else pool_hidden(hidden, seq_lens, self.pooling_type)
            )
            return {
                job.request_id: finish_vector(pooled[i], job.params) for i, job in enumerate(jobs)
            }

    def _forward(self, jobs: list[ScheduledPooling], seq_lens: list[int]) -> torch.Tensor:
        device = self.loaded.device
        model = self.loaded.model
        if getattr(model, "is_encoder", False):
            input_ids = torch.tensor([t for job in jobs for t in job.token_ids], device=device)
            positions = torch.cat([torch.arange(n) for n in seq_lens]).to(device)
            return model(input_ids, positions, seq_lens, _token_types(jobs, seq_lens, device))
        return self._decoder_forward(jobs, seq_lens)

    def _decoder_forward(self, jobs: list[ScheduledPooling], seq_lens: list[int]) -> torch.Tensor:
        """Each sequence gets consecutive blocks of a scratch cache; the runner's own input
        preparation then builds the same metadata an ordinary prefill would have."""
        block_size = _SCRATCH_BLOCK_SIZE
        requests: list[ScheduledRequest] = []
        next_block = 0
        for job, num_tokens in zip(jobs, seq_lens, strict=True):
            num_blocks = -(-num_tokens // block_size)
            requests.append(
                ScheduledRequest(
                    request_id=job.request_id,
                    token_ids=job.token_ids,
                    start=0,
                    num_tokens=num_tokens,
                    block_ids=range(next_block, next_block + num_blocks),
                    sample=False,
                    sampling_params=SamplingParams(),
                    num_prompt_tokens=num_tokens,
                )
            )
            next_block += num_blocks
        kv_caches = allocate_kv_caches(self._kv_spec, next_block, self.loaded.device)
        batch = ScheduledBatch(requests=requests, num_scheduled_tokens=sum(seq_lens))
        inputs = prepare_inputs(batch, block_size, self.loaded.device)
        if self.before_forward is not None:
            self.before_forward(inputs, next_block, block_size)
        hidden = self.loaded.model(
            inputs.input_ids, inputs.positions, kv_caches, inputs.attn_metadata
        )
        # prepare_inputs puts one-token sequences (decode rows) first; restore batch order.
        return hidden.index_select(0, _batch_order_rows(seq_lens, hidden.device))


def _token_types(
    jobs: list[ScheduledPooling], seq_lens: list[int], device: torch.device
) -> torch.Tensor | None:
    """Segment of each token (1 from a pair's second text on); None when no job is a pair."""
    if all(job.params.second_segment_start is None for job in jobs):
        return None
    types = [
        torch.arange(n) >= (n if job.params.second_segment_start is None
                            else job.params.second_segment_start)
        for job, n in zip(jobs, seq_lens, strict=True)
    ]
    return torch.cat(types).long().to(device)


def _batch_order_rows(seq_lens: list[int], device: torch.device) -> torch.Tensor:
    """Row of the prepared layout for each token in batch order (decodes first, then the
    multi-token sequences, each group in batch order)."""
    singles = [i for i, n in enumerate(seq_lens) if n == 1]
    multis = [i for i, n in enumerate(seq_lens) if n != 1]
    start_of: dict[int, int] = {}
    row = 0
    for i in singles + multis:
        start_of[i] = row
        row += seq_lens[i]
    order = [start_of[i] + j for i, n in enumerate(seq_lens) for j in range(n)]
    return torch.tensor(order, dtype=torch.int64, device=device)


class GenerateAndEmbedRunner:
    """A generative model's runner that also answers embedding requests (last-token or mean
    pooling of its final hidden states), so both kinds share one scheduler queue."""

    task = "generate"

    def __init__(self, runner: Any, pooling: PoolingExecutor) -> None:
        self.runner = runner
        self.loaded = runner.loaded
        self.pooling = pooling

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def kv_group_windows(self) -> tuple[int | None, ...]:
        return self.runner.kv_group_windows

    @property
    def lora(self) -> Any:
        """The generation runner's LoRA slots (engine/lora/slots.py), or None."""
        return self.runner.lora

    def keep_alive(self) -> None:
        """While idle: a model-parallel runner checks its ranks (ModelRunner.keep_alive)."""
        self.runner.keep_alive()

    def execute(self, batch: ScheduledBatch) -> ModelRunnerOutput:
        if not batch.pooling:
            return self.runner.execute(batch)
        embeddings = self.pooling.execute(batch.pooling)
        # The generation runner sees the batch without its embedding requests; the scheduler
        # still gets the original batch back from the engine core.
        output = self.runner.execute(replace(batch, pooling=[]))
        output.embeddings = embeddings
        return output
