"""ModelRunner over mixed batches, checked against transformers' greedy generate()."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.config import CacheConfig, ModelConfig
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0)


@dataclass
class ScriptedRequest:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    arrival_step: int
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class ScriptedScheduler:
    """Plays the scheduler: admits requests at their arrival step, splits long prompts into
    chunks of at most `chunk_size` tokens, hands out shuffled block ids, shuffles batch order."""

    def __init__(self, num_blocks: int, chunk_size: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.free_blocks = self.rng.sample(range(num_blocks), num_blocks)
        self.chunk_size = chunk_size

    def schedule(self, requests: list[ScriptedRequest], step: int) -> ScheduledBatch:
        scheduled: list[ScheduledRequest] = []
        for request in requests:
            if request.arrival_step > step or request.num_generated >= NUM_NEW_TOKENS:
                continue
            num_tokens = min(len(request.token_ids) - request.num_computed, self.chunk_size)
            end = request.num_computed + num_tokens
            while len(request.block_ids) * BLOCK_SIZE < end:
                request.block_ids.append(self.free_blocks.pop())
            scheduled.append(
                ScheduledRequest(
                    request_id=request.request_id,
                    token_ids=request.token_ids,
                    start=request.num_computed,
                    num_tokens=num_tokens,
                    block_ids=request.block_ids,
                    sample=end == len(request.token_ids),
                    sampling_params=GREEDY,
                    num_prompt_tokens=request.num_prompt_tokens,
                )
            )
        self.rng.shuffle(scheduled)
        return ScheduledBatch(scheduled, sum(r.num_tokens for r in scheduled))


def reference_greedy(hf_model: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        output = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=NUM_NEW_TOKENS
        )
    return output[0, len(prompt) :].tolist()


def make_runner(model_dir: Path, num_blocks: int) -> ModelRunner:
    return ModelRunner(
        ModelConfig(model=str(model_dir), dtype="float32"),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
        max_num_seqs=8,
    )


def test_mixed_batches_match_greedy_generate(tiny_llama) -> None:
    model_dir, hf_model = tiny_llama
    runner = make_runner(model_dir, num_blocks=64)
    assert runner.num_blocks == 64
    generator = torch.Generator().manual_seed(7)
    # "c" is prefilled in three chunks; "f" (one prompt token) takes the decode path at start 0.
    prompt_lengths = {"a": 3, "b": 11, "c": 19, "d": 6, "e": 5, "f": 1}
    arrival_steps = {"a": 0, "b": 0, "c": 0, "d": 2, "e": 5, "f": 4}
    requests = [
        ScriptedRequest(
            request_id,
            torch.randint(0, 300, (length,), generator=generator).tolist(),
            length,
            arrival_steps[request_id],
        )
        for request_id, length in prompt_lengths.items()
    ]
    scheduler = ScriptedScheduler(runner.num_blocks, chunk_size=8, seed=3)
    by_id = {request.request_id: request for request in requests}
    num_mixed_steps = 0
    for step in range(40):
        batch = scheduler.schedule(requests, step)
        if batch.is_empty:
            break
        num_decodes = sum(r.is_decode for r in batch.requests)
        num_mixed_steps += 0 < num_decodes < len(batch.requests)
        output = runner.execute(batch)
        assert output.request_ids == [r.request_id for r in batch.requests if r.sample]
        for scheduled in batch.requests:
            by_id[scheduled.request_id].num_computed += scheduled.num_tokens
        for request_id, token_id in zip(output.request_ids, output.sampled_token_ids, strict=True):
            by_id[request_id].token_ids.append(token_id)
    assert num_mixed_steps >= 3
    for request in requests:
        prompt = request.token_ids[: request.num_prompt_tokens]
        assert request.token_ids[request.num_prompt_tokens :] == reference_greedy(hf_model, prompt)


def test_empty_batch_and_chunk_without_sampling(tiny_llama) -> None:
    model_dir, _ = tiny_llama
    runner = make_runner(model_dir, num_blocks=8)
    empty = runner.execute(ScheduledBatch([], 0))
    assert (empty.request_ids, empty.sampled_token_ids) == ([], [])
    chunk = ScheduledRequest("x", list(range(10)), 0, 6, [5, 2], False, GREEDY, 10)
    output = runner.execute(ScheduledBatch([chunk], 6))
    assert (output.request_ids, output.sampled_token_ids) == ([], [])


def test_kv_cache_sizing(tiny_llama) -> None:
    model_dir, _ = tiny_llama
    # 2 layers * K,V * 4 tokens * 2 kv heads * 16 dims * 4 bytes = 2048 bytes per block.
    by_memory = ModelRunner(
        ModelConfig(model=str(model_dir), dtype="float32"),
        CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory=2048 * 10 + 100),
    )
    assert by_memory.num_blocks == 10
    assert by_memory.kv_caches[0].shape == (2, 10, BLOCK_SIZE, 2, 16)
    assert not any(cache.any() for cache in by_memory.kv_caches)
    # CPU default: max_num_seqs full-length (128-token) sequences.
    by_default = ModelRunner(
        ModelConfig(model=str(model_dir), dtype="float32"),
        CacheConfig(block_size=BLOCK_SIZE),
        max_num_seqs=3,
    )
    assert by_default.num_blocks == 3 * 128 // BLOCK_SIZE
