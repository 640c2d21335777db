"""Assembles one served model: runner (weights + KV cache), tokenizer, engine core, loop."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.engine_loop import EngineLoop
from engine.input_processor import InputProcessor, ModelLimits
from engine.request import Request
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
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


class Engine:
    def __init__(self, config: EngineConfig, runner: ModelRunner, tokenizer: Tokenizer) -> None:
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
        )
        self.processor = InputProcessor(tokenizer, limits)
        self.loop = EngineLoop(self.core, self.processor)
        names = config.model.served_model_names or (config.model.model,)
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
        )

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load weights and tokenizer, allocate the KV cache, and run one warm-up request.
        Raises ModelLoadError for a model directory that cannot be served."""
        runner = ModelRunner(config.model, config.cache, max_num_seqs=config.scheduler.max_num_seqs)
        tokenizer = Tokenizer.load(
            config.model.tokenizer or config.model.model, chat_template=config.model.chat_template
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
        self.core.add_request(request)
        while self.core.has_unfinished_requests:
            self.core.step()
        logger.info("warm-up done in %.2f s", time.perf_counter() - start)

    def resolve_model_name(self, name: str) -> bool:
        return not name or name in self.model.names
