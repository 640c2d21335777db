"""Offline, in-process generation: a thin client of the server's own pieces, with no server
and no threads. The fastest path, used by benchmarks and by tests that compare tokens with
transformers or with the served engine.

    generate(): InputProcessor (the server's: limits, max_tokens, EOS ids, n choices)
      -> CoreRequests -> EngineCore.add_request (matchers from the core's grammar compiler,
         make_grammar_compiler as the served core builds it)
      -> EngineCore.step() on this thread -> RequestStream (the server's output path: stop
         strings, finish reasons) -> one CompletionOutput per choice

Token ids in, token ids out. The model's tokenizer, when the checkpoint has one, is loaded as
the server loads it: its EOS ends generation here as it does served, and it gives stop strings
their text. A checkpoint without a tokenizer runs without stop strings and guided decoding.
best_of > n is for the servers (they pick the best candidates from streamed logprobs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from engine.core.build import ModelFacts, load_tokenizer, make_grammar_compiler, served_eos_ids
from engine.core.core_request import CoreRequest
from engine.core.engine_core import EngineCore
from engine.core.intake import compile_grammars
from engine.core.outputs import RequestOutput, TokenLogprobs
from engine.core.request import FinishReason
from engine.errors import InvalidRequestError
from engine.frontend.beam_search import (
    BeamCandidate,
    BeamSearch,
    EarlyStopping,
    beam_stop_token_ids,
    beam_width,
    check_beam_search_params,
    run_beam_searches,
)
from engine.frontend.best_of import picks_best_of
from engine.frontend.input_processor import InputProcessor
from engine.frontend.request_stream import RequestStream
from engine.frontend.sampling_resolution import ModelLimits
from engine.generation import (
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    PromptInput,
)
from engine.lora.request import LoRARequest
from engine.models.hub import local_model_config
from engine.distributed.launch import start_model_runner
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import parse_speculative_config
from engine.structured.compiler import GrammarCompiler
from engine.structured.constraint import OutputConstraint
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engine.structured.grammar import Grammar


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


class _OfflineStream(RequestStream):
    """The server's RequestStream (stop strings, finish reasons) as its own event sink: it
    keeps plain token ids and the engine's own logprobs (no token texts, no event per token;
    only the Finished event is built)."""

    def __init__(self, index: int, request: CoreRequest, prompt_token_ids: list[int],
                 tokenizer: Tokenizer | None) -> None:
        super().__init__(index, request.request_id, request.prompt_token_ids,
                         request.sampling_params, self, tokenizer, return_text=False)
        self.prompt_token_ids = prompt_token_ids
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.finished: GenerationFinished | None = None

    def _deliver(self, output: RequestOutput, text: str, last: bool) -> None:
        self.token_ids.extend(output.new_token_ids)
        if output.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(output.logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs

    def put_nowait(self, event: GenerationEvent | BaseException) -> None:
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, GenerationFinished):
            self.finished = event

    def qsize(self) -> int:
        return 0

    def output(self) -> CompletionOutput:
        finished = self.finished
        return CompletionOutput(
            self.prompt_token_ids, self.token_ids,
            finished.reason if finished is not None else FinishReason.ABORT,
            self.num_cached_tokens, self.logprobs, self.prompt_logprobs,
            finished.message if finished is not None else None,
        )


class LLM:
    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        load_format: str = "auto",
        revision: str | None = None,
        download_dir: str | None = None,
        attention_backend: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        scheduling_policy: str = "fcfs",
        guided_decoding_backend: str = "llguidance",
        lora: LoRAConfig | None = None,
        speculative_config: dict | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        pipeline_micro_batches: int | None = None,
        pipeline_micro_batch_min_tokens: int = 64,
        distributed_timeout_s: float = 60.0,
        enable_expert_parallel: bool = False,
    ) -> None:
        """`lora`: serve LoRA adapters, named per prompt by `generate(lora_requests=...)`.
        `tensor_parallel_size` or `pipeline_parallel_size` > 1: this process is rank 0 and
        starts the other ranks as processes of their own; `close()` stops them."""
        self.config = EngineConfig(
            # A hub id is downloaded (or found in the cache) here, once: the runner and the
            # tokenizer then read the same snapshot directory.
            model=local_model_config(ModelConfig(
                model=model, dtype=dtype, max_model_len=max_model_len, device=device,
                load_format=load_format, revision=revision, download_dir=download_dir,
                attention_backend=attention_backend)),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                gpu_memory_utilization=gpu_memory_utilization,
                num_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching,
                kv_cache_dtype=kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                policy=scheduling_policy,
            ),
            guided_decoding_backend=guided_decoding_backend,
            lora=lora,
            speculative=(
                parse_speculative_config(speculative_config) if speculative_config else None
            ),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                    pipeline_parallel_size=pipeline_parallel_size,
                                    pipeline_micro_batches=pipeline_micro_batches,
                                    pipeline_micro_batch_min_tokens=(
                                        pipeline_micro_batch_min_tokens),
                                    distributed_timeout_s=distributed_timeout_s,
                                    enable_expert_parallel=enable_expert_parallel),
        )
        self.runner = start_model_runner(self.config, exit_on_rank_death=False)
        self.max_model_len = self.runner.loaded.max_model_len
        self.core = EngineCore(self.config, self.runner, self.max_model_len)
        self.facts = ModelFacts.of(self.runner)
        self.tokenizer = _load_tokenizer_if_any(self.config)
        self.processor = InputProcessor(self.tokenizer, ModelLimits(
            max_model_len=self.max_model_len,
            vocab_size=self.facts.vocab_size,
            eos_token_ids=served_eos_ids(self.facts, self.tokenizer),
            kv_capacity_tokens=self.facts.num_blocks * block_size,
            # No client here to hold to --max-logprobs: any count the vocabulary has.
            max_logprobs=self.facts.vocab_size,
        ))
        self._next_id = 0
        self._grammar_compiler: GrammarCompiler | None = None

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (the model stays usable only with
        tensor_parallel_size 1)."""
        self.runner.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The core's grammar compiler, built as the served core builds its own, on first
        use: its token table costs nothing to unconstrained runs."""
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "guided decoding needs the model's tokenizer, and it has none",
                    field="constraint")
            self._grammar_compiler = make_grammar_compiler(self.config, self.facts, self.tokenizer)
            assert self._grammar_compiler is not None  # a generation runner
        return self._grammar_compiler

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        *,
        priorities: list[int] | None = None,
        constraints: OutputConstraint | list[OutputConstraint | None] | None = None,
        lora_requests: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[CompletionOutput]:
        """Submit every prompt at once (continuous batching does the rest) and run the
        engine until all finish. One output per choice, in prompt order (a prompt's n
        choices side by side). Everything is checked, and `constraints` (one for all prompts,
        or one per prompt) compiled, before anything runs."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if not isinstance(constraints, list):
            constraints = [constraints] * len(prompts)
        # This API's boundary: each distinct params and constraint validated once, here.
        for p in {id(p): p for p in per_prompt}.values():
            self._check_params(p)
        for constraint in {c for c in constraints if c is not None}:
            constraint.validate()
        if not isinstance(lora_requests, list):
            lora_requests = [lora_requests] * len(prompts)
        if self.config.lora is None and any(lora_requests):
            raise InvalidRequestError("LoRA adapters need LLM(lora=LoRAConfig(...))", field="lora")
        return self._generate(prompts, per_prompt, priorities, constraints, lora_requests)

    def _check_params(self, params: SamplingParams) -> None:
        params.validate()
        if params.use_beam_search:
            raise InvalidRequestError("use LLM.beam_search for beam search", field="use_beam_search")
        if picks_best_of(params):
            raise InvalidRequestError("best_of > n needs a server (engine-serve)", field="best_of")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need the model's tokenizer, and it has none",
                                      field="stop")

    def _generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        priorities: list[int] | None,
        constraints: list[OutputConstraint | None],
        loras: list[LoRARequest | None],
    ) -> list[CompletionOutput]:
        requests: list[CoreRequest] = []
        streams: list[_OfflineStream] = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            req = GenerationRequest(
                f"offline-{self._next_id}", PromptInput(token_ids=prompt), p,
                priority=priorities[i] if priorities else 0, return_text=False,
                constraint=constraints[i], lora=loras[i],
            )
            self._next_id += 1
            prepared = self.processor.prepare_prompt(req)
            for index, request in enumerate(self.processor.make_requests(req, prepared)):
                requests.append(request)
                streams.append(_OfflineStream(index, request, list(prepared.token_ids),
                                              self.tokenizer))
        grammars = self._compile(requests)
        for request, grammar in zip(requests, grammars):
            self.core.add_request(request, grammar)
        self._run({request.request_id: stream for request, stream in zip(requests, streams)})
        return [stream.output() for stream in streams]

    def _compile(self, requests: list[CoreRequest]) -> list[Grammar | None]:
        if all(request.constraint is None for request in requests):
            return [None] * len(requests)
        compiler = self.grammar_compiler
        # On the compiler's own (large-stack) thread, behind its token-table warm-up.
        return compiler.submit(lambda: compile_grammars(compiler, requests)).result()

    def _run(self, live: dict[str, _OfflineStream]) -> None:
        """Step until every request is done, each output through its stream, as the engine
        loop dispatches them."""
        core = self.core
        # First the outputs of requests refused on arrival (an adapter that cannot be read).
        outputs = core.scheduler.take_pending_outputs()
        while outputs or core.has_unfinished_requests:
            outputs, to_deliver = [], outputs or core.step()
            for out in to_deliver:
                stream = live.get(out.request_id)
                if stream is None:
                    continue  # stopped by a stop string: this is its abort's output
                done, stopped_early = stream.on_output(out)
                if done:
                    del live[out.request_id]
                    if stopped_early:  # a stop string: the core must stop it too
                        core.abort_requests([out.request_id], FinishReason.STOP)

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
        params.validate()  # this API's boundary
        check_beam_search_params(params)
        stop_ids = beam_stop_token_ids(params, self.processor.limits.eos_token_ids)
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
            outputs = self._generate(sequences, [step] * len(sequences), None,
                                     [None] * len(sequences), [None] * len(sequences))
            entries = [out.logprobs[0] for out in outputs]  # type: ignore[index]
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


def _load_tokenizer_if_any(config: EngineConfig) -> Tokenizer | None:
    """The tokenizer as the server loads it; None for a checkpoint directory without one
    (test and benchmark models are often weights alone)."""
    directory = Path(config.model.tokenizer or config.model.model).expanduser()
    if directory.is_dir() and not any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    return load_tokenizer(config, announce=False)
