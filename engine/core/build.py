"""Builds the model side of a served engine: runner (weights + KV cache) and EngineCore.

Used in the serving process with `--engine-core thread`, and in the engine core process
(`engine.core.process_main`) otherwise. What the serving side needs to know about the model
travels back as `ModelFacts`, plain data that crosses a process boundary.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.core.engine_core import EngineCore
from engine.errors import ModelLoadError
from engine.models.loader import read_architecture
from engine.models.registry import is_classifier, is_generative
from engine.models.sequence_classifier import classifier_labels, cross_encoder_activation
from engine.pooling_params import PoolingParams
from engine.core.core_request import CoreRequest
from engine.distributed.launch import start_model_runner
from engine.distributed.step_message import send_forward
from engine.runner.embedding_runner import EmbeddingRunner
from engine.runner.model_runner import ModelRunner
from engine.runner.pooling import GenerateAndEmbedRunner, PoolingExecutor, resolve_pooling_type
from engine.sampling_params import SamplingParams
from engine.structured.compiler import GrammarCompiler
from engine.structured.grammar import TokenizerInfo
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

EngineRunner = ModelRunner | EmbeddingRunner | GenerateAndEmbedRunner


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """The loaded model and KV cache as the serving side sees them."""

    architecture: str
    dtype: str
    max_model_len: int
    vocab_size: int
    hidden_size: int
    # From the model's configs; the tokenizer's EOS is added by `served_eos_ids`.
    eos_token_ids: frozenset[int]
    num_blocks: int
    task: str  # "generate" | "embed"
    # Sequence classifiers: the label of each logit (empty for every other model), and how a
    # one-logit cross-encoder's output becomes a score ("sigmoid" | "identity").
    labels: tuple[str, ...] = ()
    score_activation: str = "sigmoid"

    @classmethod
    def of(cls, runner: EngineRunner) -> ModelFacts:
        loaded = runner.loaded
        return cls(
            architecture=loaded.architecture,
            dtype=str(loaded.dtype).removeprefix("torch."),
            max_model_len=loaded.max_model_len,
            vocab_size=loaded.vocab_size,
            hidden_size=loaded.hf_config.hidden_size,
            eos_token_ids=frozenset(loaded.eos_token_ids),
            num_blocks=runner.num_blocks,
            task=getattr(runner, "task", "generate"),
            labels=(classifier_labels(loaded.hf_config)
                    if is_classifier(loaded.architecture) else ()),
            score_activation=cross_encoder_activation(loaded.hf_config),
        )


def load_tokenizer(config: EngineConfig, *, announce: bool = True) -> Tokenizer:
    """`announce`: log the chat template's content format (once per server, not per process
    that loads the tokenizer)."""
    model = config.model
    return Tokenizer.load(
        model.tokenizer or model.model,
        chat_template=model.chat_template,
        content_format=model.chat_template_content_format,
        announce=announce,
    )


def served_eos_ids(facts: ModelFacts, tokenizer: Tokenizer | None) -> frozenset[int]:
    """What ends generation, served or offline: the model's EOS ids and the tokenizer's."""
    eos_ids = set(facts.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return frozenset(eos_ids)


def make_grammar_compiler(
    config: EngineConfig, facts: ModelFacts, tokenizer: Tokenizer
) -> GrammarCompiler | None:
    """None for embedding-only models. The backend's token table (~1 s for a 128k
    vocabulary, plus the library's import) is built at once on the compiler's worker thread,
    so readiness does not wait for it and the first guided request, queued behind it on that
    thread, does not pay for it. A tokenizer the backend cannot use only disables guided
    decoding: such requests then fail with the reason."""
    if facts.task != "generate":
        return None
    compiler = GrammarCompiler(
        TokenizerInfo(tokenizer.hf, facts.vocab_size, tuple(sorted(served_eos_ids(facts, tokenizer)))),
        default_backend=config.guided_decoding_backend,
    )

    def warm_up() -> None:
        try:
            compiler.warm_up()
        except Exception as exc:  # noqa: BLE001 - any library failure, reported per request
            if compiler.closed:  # stopped within moments of starting: the import raced exit
                logger.debug("grammar warm-up cut short by shutdown: %s", exc)
            else:
                logger.warning("guided decoding unavailable: %s", exc)

    compiler.submit(warm_up)
    return compiler


def build_core(config: EngineConfig, bos_token_id: int | None) -> tuple[EngineCore, ModelFacts]:
    """Load weights, allocate the KV cache, and run one warm-up request through the whole
    step path, so the first user request does not pay for lazy initialisation. Raises
    ModelLoadError for a model directory that cannot be served."""
    runner = make_runner(config)
    facts = ModelFacts.of(runner)
    core = EngineCore(config, runner, facts.max_model_len)
    start = time.perf_counter()
    token_id = bos_token_id if bos_token_id is not None else 0
    if facts.task == "embed":
        request = CoreRequest("warmup", (token_id,) * 2, SamplingParams(), max_tokens=0,
                              pooling_params=PoolingParams())
    else:
        request = CoreRequest("warmup", (token_id,) * 2,
                              SamplingParams(temperature=0.0, max_tokens=2), max_tokens=2)
    core.add_request(request)
    while core.has_unfinished_requests:
        core.step()
    logger.info("warm-up done in %.2f s", time.perf_counter() - start)
    return core, facts


def close_runner(runner: EngineRunner) -> None:
    """Stop a tensor-parallel runner's other ranks (STOP, so ranks on other machines leave
    with status 0); nothing for any other runner."""
    inner = runner.runner if isinstance(runner, GenerateAndEmbedRunner) else runner
    if isinstance(inner, ModelRunner):
        inner.close()


def resolve_task(config: EngineConfig) -> str:
    """`--task auto`: encoders embed, decoders generate (and embed on request). Reads only
    config.json, so a directory that cannot be served fails here, before anything loads."""
    model_config = config.model
    generative = is_generative(read_architecture(model_config.model))
    task = model_config.task
    if task == "auto":
        task = "generate" if generative else "embed"
    if task == "generate" and not generative:
        raise ModelLoadError(
            f"{model_config.model} is an encoder (embedding) model; serve it with --task embed"
        )
    return task


def make_runner(config: EngineConfig) -> EngineRunner:
    model_config = config.model
    if resolve_task(config) == "embed":
        if config.parallel.world_size > 1:
            raise ValueError("--tensor-parallel-size / --pipeline-parallel-size > 1 serve "
                             "generative models only")
        return EmbeddingRunner(model_config)
    # A served core: a tensor-parallel rank that dies takes this process with it.
    runner = start_model_runner(config, exit_on_rank_death=True)
    pooling_type = resolve_pooling_type(model_config.pooling_type, runner.loaded)
    pooling = PoolingExecutor(runner.loaded, pooling_type)
    if runner.tp.world_size > 1:
        tp = runner.tp
        pooling.before_forward = lambda inputs, blocks, _: send_forward(
            tp, inputs.input_ids, inputs.positions, inputs.attn_metadata, blocks)
    return GenerateAndEmbedRunner(runner, pooling)
