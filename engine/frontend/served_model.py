"""Assembles one served model for the servers: tokenizer, input processors and the engine
loop, around an EngineCore that runs in its own process (`--engine-core process`, the
default: the serving threads never hold the GIL the step loop needs) or on a thread of this
one (`--engine-core thread`).

Task "generate": the generation runner, which also answers embedding requests by pooling
its hidden states. Task "embed": an embedding-only runner without KV cache (encoders, or
decoders served as embedders). Both kinds of request share the scheduler's one queue."""
from __future__ import annotations

import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.core.build import (
    ModelFacts,
    build_core,
    load_tokenizer,
    make_grammar_compiler,
    resolve_task,
    served_eos_ids,
)
from engine.core.threaded_core import ThreadedCore
from engine.frontend.core_client import ProcessCore
from engine.frontend.embedding_input import EmbeddingInputProcessor, EmbeddingLimits
from engine.frontend.engine_loop import CoreClient, EngineLoop
from engine.frontend.input_processor import InputProcessor
from engine.frontend.sampling_resolution import ModelLimits
from engine.lora.registry import LoRARegistry, make_lora_registry
from engine.lora.request import LoRARequest
from engine.structured.validator import ConstraintValidator
from engine.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What Discovery reports about the served model."""

    names: tuple[str, ...]
    root: str
    architecture: str
    dtype: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    block_size: int
    num_blocks: int
    has_chat_template: bool
    created: int
    task: str = "generate"  # "generate" | "embed"
    # A sequence classifier's label per logit (Classify, Score); empty for other models.
    labels: tuple[str, ...] = ()
    score_activation: str = "sigmoid"  # one-logit cross-encoders: "sigmoid" | "identity"


class Engine:
    def __init__(
        self, config: EngineConfig, facts: ModelFacts, tokenizer: Tokenizer, core: CoreClient,
        loras: LoRARegistry | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        eos_ids = served_eos_ids(facts, tokenizer)
        block_size = config.cache.block_size
        limits = ModelLimits(
            max_model_len=facts.max_model_len,
            vocab_size=facts.vocab_size,
            eos_token_ids=eos_ids,
            kv_capacity_tokens=facts.num_blocks * block_size,
            max_logprobs=config.model.max_logprobs,
        )
        names = config.model.served_model_names or (config.model.model,)
        # Requests are validated here before they queue, constraints included; the core
        # compiles the constraints (its grammar compiler holds the one token table).
        self.constraint_validator = (
            ConstraintValidator(config.guided_decoding_backend)
            if facts.task == "generate" else None
        )
        self.processor = InputProcessor(
            tokenizer, limits, model_name=names[0], constraints=self.constraint_validator
        )
        self.loop = EngineLoop(core, self.processor, config.scheduler.max_num_seqs)
        self.task: str = facts.task
        self.embedding_processor = EmbeddingInputProcessor(
            tokenizer, EmbeddingLimits(facts.max_model_len, facts.vocab_size, facts.hidden_size)
        )
        self.model = ServedModel(
            names=tuple(names),
            root=config.model.model,
            architecture=facts.architecture,
            dtype=facts.dtype,
            max_model_len=facts.max_model_len,
            vocab_size=facts.vocab_size,
            eos_token_ids=eos_ids,
            bos_token_id=tokenizer.bos_token_id,
            block_size=block_size,
            num_blocks=facts.num_blocks,
            has_chat_template=tokenizer.has_chat_template,
            created=int(time.time()),
            task=self.task,
            labels=facts.labels,
            score_activation=facts.score_activation,
        )
        # --enable-lora: the adapters served under names of their own (None: LoRA off).
        self.loras = loras

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load the tokenizer here and the model where its core runs (warmed up by one
        request). Raises ModelLoadError for a model directory that cannot be served."""
        task = resolve_task(config)  # an unservable directory fails before anything loads
        # --lora-modules are checked before the model loads: a bad one fails start-up at once.
        names = config.model.served_model_names or (config.model.model,)
        loras = make_lora_registry(config, names) if task == "generate" else None
        core: CoreClient
        if config.engine_core == "process":
            loaded: list[Tokenizer] = []

            def tokenizer_bos_id() -> int | None:
                # Runs while the core process starts up: both take seconds.
                loaded.append(load_tokenizer(config))
                return loaded[0].bos_token_id

            core = ProcessCore(config, tokenizer_bos_id)
            tokenizer, facts = loaded[0], core.facts
        else:
            tokenizer = load_tokenizer(config)
            engine_core, facts = build_core(config, tokenizer.bos_token_id)
            # The core's own compiler, as the core process builds one for itself.
            core = ThreadedCore(engine_core, make_grammar_compiler(config, facts, tokenizer))
        return cls(config, facts, tokenizer, core, loras)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the core (its step loop and grammar compiler, or its process)."""
        if self.constraint_validator is not None:
            self.constraint_validator.close()
        self.loop.stop(timeout)

    def resolve_model_name(self, name: str) -> bool:
        return not name or name in self.model.names or self.lora_for(name) is not None

    def lora_for(self, name: str) -> LoRARequest | None:
        """The adapter served as `name`, or None (the base model, or no such adapter)."""
        return self.loras.get(name) if self.loras is not None and name else None
