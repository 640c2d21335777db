"""Offline, in-process generation over the engine core (no servers, no threads): the
fastest path, used by benchmarks and by tests that compare tokens with transformers.

Token-level only: stop strings and detokenized streaming live on the serving path
(engine_loop); `generate` rejects stop strings rather than ignoring them.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.frontend.beam_search import (
    BeamCandidate,
    BeamSearch,
    EarlyStopping,
    beam_stop_token_ids,
    beam_width,
    check_beam_search_params,
    run_beam_searches,
)
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core.engine_core import EngineCore
from engine.errors import InvalidRequestError
from engine.core.outputs import TokenLogprobs
from engine.core.request import FinishReason, Request
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
        device: str = "auto",
        load_format: str = "auto",
        attention_backend: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        scheduling_policy: str = "fcfs",
        guided_decoding_backend: str = "llguidance",
    ) -> None:
        self.config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len,
                              device=device, load_format=load_format,
                              attention_backend=attention_backend),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                gpu_memory_utilization=gpu_memory_utilization,
                num_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                policy=scheduling_policy,
            ),
        )
        self.runner = ModelRunner(
            self.config.model,
            self.config.cache,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
        )
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
            if p.use_beam_search:
                raise InvalidRequestError("use LLM.beam_search for beam search", field="use_beam_search")
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

    def beam_search(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        early_stopping: EarlyStopping = False,
    ) -> list[list[CompletionOutput]]:
        """Beam search (see engine/frontend/beam_search.py): per prompt, the params.n best of
        beam_width(params) beams, best first. `early_stopping` as transformers spells it;
        the servers use False, transformers' default."""
        check_beam_search_params(params)
        stop_ids = beam_stop_token_ids(params, frozenset(self.runner.loaded.eos_token_ids))
        searches = [
            BeamSearch(
                beam_width(params),
                max(1, min(self.max_model_len - len(prompt), params.max_tokens or self.max_model_len)),
                stop_ids, params.length_penalty, early_stopping,
            )
            for prompt in prompts
        ]
        num_top = max(searches[0].num_candidates, params.logprobs or 0) if searches else 0
        step = SamplingParams(temperature=0.0, max_tokens=1, logprobs=num_top)

        def expand(sequences: list[list[int]]) -> list[tuple[list[BeamCandidate], object]]:
            entries = [out.logprobs[0] for out in self.generate(sequences, step)]  # type: ignore[index]
            return [
                ([BeamCandidate(t, lp) for t, lp in zip(e.top_token_ids, e.top_logprobs)], e)
                for e in entries
            ]

        run_beam_searches(prompts, searches, expand)
        return [
            [
                CompletionOutput(
                    prompt, list(h.beam.token_ids),
                    FinishReason.STOP if h.stop_token_id is not None else FinishReason.LENGTH, 0,
                    None if params.logprobs is None else [
                        _beam_token_logprobs(e, t, params.logprobs)  # type: ignore[arg-type]
                        for e, t in zip(h.beam.details, h.beam.token_ids)
                    ],
                )
                for h in search.best(params.n)
            ]
            for prompt, search in zip(prompts, searches)
        ]


def _beam_token_logprobs(entry: TokenLogprobs, token_id: int, num_top: int) -> TokenLogprobs:
    """A step's entry seen from the beam's token, which is among its top tokens."""
    rank = entry.top_token_ids.index(token_id)
    return TokenLogprobs(
        token_id, entry.top_logprobs[rank], rank + 1,
        entry.top_token_ids[:num_top], entry.top_logprobs[:num_top],
    )
