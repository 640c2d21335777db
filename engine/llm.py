"""Offline, in-process generation over the engine core (no servers, no threads): the
fastest path, used by benchmarks and by tests that compare tokens with transformers.

Token-level only: stop strings and detokenized streaming live on the serving path
(engine_loop); `generate` rejects stop strings rather than ignoring them.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.engine_core import EngineCore
from engine.errors import InvalidRequestError
from engine.request import FinishReason, Request
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason
    num_cached_tokens: int


class LLM:
    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        scheduling_policy: str = "fcfs",
    ) -> None:
        self.config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                num_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                policy=scheduling_policy,
            ),
        )
        self.runner = ModelRunner(self.config.model, self.config.cache, max_num_seqs=max_num_seqs)
        self.max_model_len = self.runner.loaded.max_model_len
        self.core = EngineCore(self.config, self.runner, self.max_model_len)
        self._next_id = 0

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        *,
        priorities: list[int] | None = None,
    ) -> list[CompletionOutput]:
        """Submit every prompt at once (continuous batching does the rest) and run the
        engine until all finish. Outputs are in prompt order."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True)):
            p.validate()
            if p.stop:
                raise InvalidRequestError("stop strings need the serving path", field="stop")
            if not prompt or len(prompt) >= self.max_model_len:
                raise InvalidRequestError(f"prompt {i} is empty or too long", field="prompt")
            budget = self.max_model_len - len(prompt)
            request = Request(
                f"offline-{self._next_id}",
                prompt,
                p,
                max_tokens=min(budget, p.max_tokens) if p.max_tokens else budget,
                eos_token_ids=self.runner.loaded.eos_token_ids,
                priority=priorities[i] if priorities else 0,
            )
            self._next_id += 1
            requests.append(request)
            self.core.add_request(request)
        while self.core.has_unfinished_requests:
            self.core.step()
        return [
            CompletionOutput(
                r.prompt_token_ids, r.output_token_ids, r.finish_reason or FinishReason.ABORT,
                r.num_cached_tokens,
            )
            for r in requests
        ]
