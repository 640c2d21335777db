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
from engine.outputs import TokenLogprobs
from engine.request import FinishReason, Request
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.structured.compiler import GrammarCompiler
from engine.structured.constraint import OutputConstraint
from engine.structured.grammar import TokenizerInfo
from engine.tokenizer import Tokenizer



@dataclass(frozen=True, slots=True)
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason
    num_cached_tokens: int
    # Per output token, when the params asked for logprobs.
    logprobs: list[TokenLogprobs] | None = None
    # Per prompt token (None first), when the params asked for prompt_logprobs.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # Why it finished, when the engine says more than the reason (e.g. CONSTRAINT).
    finish_message: str | None = None


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
        guided_decoding_backend: str = "llguidance",
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
        self._guided_decoding_backend = guided_decoding_backend
        self._grammar_compiler: GrammarCompiler | None = None

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Built on first use: loading the tokenizer costs nothing to unconstrained runs."""
        if self._grammar_compiler is None:
            tokenizer = Tokenizer.load(self.config.model.model)
            loaded = self.runner.loaded
            eos_ids = set(loaded.eos_token_ids)
            if tokenizer.eos_token_id is not None:
                eos_ids.add(tokenizer.eos_token_id)
            info = TokenizerInfo(tokenizer.hf, loaded.vocab_size, tuple(sorted(eos_ids)))
            self._grammar_compiler = GrammarCompiler(
                info, default_backend=self._guided_decoding_backend
            )
        return self._grammar_compiler

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        *,
        priorities: list[int] | None = None,
        constraints: OutputConstraint | list[OutputConstraint | None] | None = None,
    ) -> list[CompletionOutput]:
        """Submit every prompt at once (continuous batching does the rest) and run the
        engine until all finish. Outputs are in prompt order. `constraints` (one for all
        prompts, or one per prompt) are compiled here, before anything runs."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if not isinstance(constraints, list):
            constraints = [constraints] * len(prompts)
        grammars = [
            None if c is None else self.grammar_compiler.new_grammars(c, 1)[0]
            for c in constraints
        ]
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
            request.grammar = grammars[i]
            self._next_id += 1
            requests.append(request)
            self.core.add_request(request)
        logprobs: dict[str, list[TokenLogprobs]] = {}
        prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        messages: dict[str, str] = {}
        while self.core.has_unfinished_requests:
            for out in self.core.step():
                if out.finish_message:
                    messages[out.request_id] = out.finish_message
                if out.logprobs is not None:
                    logprobs.setdefault(out.request_id, []).extend(out.logprobs)
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
        return [
            CompletionOutput(
                r.prompt_token_ids, r.output_token_ids, r.finish_reason or FinishReason.ABORT,
                r.num_cached_tokens, logprobs.get(r.request_id),
                prompt_logprobs.get(r.request_id), messages.get(r.request_id),
            )
            for r in requests
        ]
