"""Assembles one served model: runner (weights + KV cache), tokenizer, engine core, loop.

Task "generate": the generation runner, which also answers embedding requests by pooling
its hidden states. Task "embed": an embedding-only runner without KV cache (encoders, or
decoders served as embedders). Both kinds of request share the scheduler's one queue."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.engine_loop import EngineLoop
from engine.embedding_input import EmbeddingInputProcessor, EmbeddingLimits
from engine.errors import ModelLoadError
from engine.input_processor import InputProcessor, ModelLimits
from engine.models.loader import read_architecture
from engine.models.registry import is_generative
from engine.pooling_params import PoolingParams
from engine.request import Request
from engine.runner.embedding_runner import EmbeddingRunner
from engine.runner.model_runner import ModelRunner
from engine.runner.pooling import GenerateAndEmbedRunner, PoolingExecutor, resolve_pooling_type
from engine.sampling_params import SamplingParams
from engine.structured.compiler import GrammarCompiler
from engine.structured.grammar import TokenizerInfo

from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


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


class Engine:
    def __init__(self, config: EngineConfig, runner: EngineRunner, tokenizer: Tokenizer) -> None:
        loaded = runner.loaded
        eos_ids = set(loaded.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.config = config
        self.tokenizer = tokenizer
        self.core = EngineCore(config, runner, loaded.max_model_len)
        block_size = config.cache.block_size
        limits = ModelLimits(
            max_model_len=loaded.max_model_len,
            vocab_size=loaded.vocab_size,
            eos_token_ids=frozenset(eos_ids),
            kv_capacity_tokens=runner.num_blocks * block_size,
            max_logprobs=config.model.max_logprobs,
        )
        names = config.model.served_model_names or (config.model.model,)
        self.grammar_compiler: GrammarCompiler | None = None
        if getattr(runner, "task", "generate") == "generate":
            self.grammar_compiler = GrammarCompiler(
                TokenizerInfo(tokenizer.hf, loaded.vocab_size, tuple(sorted(eos_ids))),
                default_backend=config.guided_decoding_backend,
            )
        self.processor = InputProcessor(
            tokenizer, limits, model_name=names[0], grammar_compiler=self.grammar_compiler
        )
        self.loop = EngineLoop(self.core, self.processor)
        self.task: str = getattr(runner, "task", "generate")
        self.embedding_processor = EmbeddingInputProcessor(
            tokenizer,
            EmbeddingLimits(loaded.max_model_len, loaded.vocab_size, loaded.hf_config.hidden_size),
        )
        self.model = ServedModel(
            names=tuple(names),
            root=config.model.model,
            architecture=loaded.architecture,
            dtype=str(loaded.dtype).removeprefix("torch."),
            max_model_len=loaded.max_model_len,
            vocab_size=loaded.vocab_size,
            eos_token_ids=limits.eos_token_ids,
            bos_token_id=tokenizer.bos_token_id,
            block_size=block_size,
            num_blocks=runner.num_blocks,
            has_chat_template=tokenizer.has_chat_template,
            created=int(time.time()),
            task=self.task,
        )

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load weights and tokenizer, allocate the KV cache, and run one warm-up request.
        Raises ModelLoadError for a model directory that cannot be served."""
        runner = _make_runner(config)
        tokenizer = Tokenizer.load(
            config.model.tokenizer or config.model.model,
            chat_template=config.model.chat_template,
            content_format=config.model.chat_template_content_format,
        )
        engine = cls(config, runner, tokenizer)
        engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """One tiny request through the whole step path before readiness turns SERVING, so
        the first user request does not pay for lazy initialisation."""
        start = time.perf_counter()
        token_id = self.model.bos_token_id if self.model.bos_token_id is not None else 0
        request = Request(
            "warmup", [token_id] * 2, SamplingParams(temperature=0.0, max_tokens=2), max_tokens=2
        )
        if self.task == "embed":
            request = Request(
                "warmup", [token_id] * 2, SamplingParams(), max_tokens=0,
                pooling_params=PoolingParams(),
            )
        self.core.add_request(request)
        while self.core.has_unfinished_requests:
            self.core.step()
        if self.grammar_compiler is not None:
            # The grammar backend's token table (~1 s for a 128k vocabulary), built now so
            # the first guided request does not pay for it. A tokenizer it cannot use only
            # disables guided decoding: such requests then fail with the reason.
            try:
                self.grammar_compiler.warm_up()
            except Exception as exc:  # noqa: BLE001 - any library failure, reported per request
                logger.warning("guided decoding unavailable: %s", exc)
        logger.info("warm-up done in %.2f s", time.perf_counter() - start)

    def resolve_model_name(self, name: str) -> bool:
        return not name or name in self.model.names


def _make_runner(config: EngineConfig) -> EngineRunner:
    """`--task auto`: encoders embed, decoders generate (and embed on request)."""
    model_config = config.model
    generative = is_generative(read_architecture(model_config.model))
    task = model_config.task
    if task == "auto":
        task = "generate" if generative else "embed"
    if task == "generate" and not generative:
        raise ModelLoadError(
            f"{model_config.model} is an encoder (embedding) model; serve it with --task embed"
        )
    if task == "embed":
        return EmbeddingRunner(model_config)
    runner = ModelRunner(
        model_config,
        config.cache,
        max_num_seqs=config.scheduler.max_num_seqs,
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
    )
    pooling_type = resolve_pooling_type(model_config.pooling_type, runner.loaded)
    return GenerateAndEmbedRunner(runner, PoolingExecutor(runner.loaded, pooling_type))


EngineRunner = ModelRunner | EmbeddingRunner | GenerateAndEmbedRunner
