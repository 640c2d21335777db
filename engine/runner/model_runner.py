"""ModelRunner: owns the model and the KV cache; one `execute` per engine step."""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from engine.attention import resolve_attention_backend
from engine.attention.backend import AttentionMetadata
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.config import CacheConfig, LoRAConfig, ModelConfig
from engine.distributed.group import SINGLE, TensorParallel, all_reduce_min
from engine.distributed.step_message import (
    send_forward,
    send_heartbeat,
    send_logits_rows,
    send_lora_step,
)
from engine.kv_cache.groups import kv_cache_groups
from engine.models.loader import LoadedModel, load_model, resolve_device
from engine.core.outputs import ModelRunnerOutput
from engine.runner.input_prep import prepare_inputs
from engine.runner.kv_memory import (
    KVCacheSpec,
    allocate_kv_caches,
    determine_num_blocks,
    needs_memory_profile,
)
from engine.runner.memory_profile import (
    profile_batches,
    profile_memory,
    profile_num_blocks,
)
from engine.lora.slots import LoRASlots
from engine.runner.prompt_logprobs import score_prompt_chunks
from engine.sampling.sampler import Sampler
from engine.spec_decode.runner_step import has_drafts, sample_with_drafts

logger = logging.getLogger(__name__)

# An idle model-parallel server checks its ranks this often (no collective runs otherwise, so
# a dead rank on another machine would go unnoticed until the next request); a rank that does
# not answer within the timeout fails the core (a dead process fails it at once: its sockets
# close).
HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TIMEOUT_S = 10.0

HiddenStateHook = Callable[
    [list[ScheduledRequest], list[int], torch.Tensor, ModelRunnerOutput], None
]


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        attention_backend: str | None = None,
        lora_config: LoRAConfig | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """`tp`: this process's tensor-parallel rank (engine/distributed/): the model holds
        its slice, the KV cache its KV heads; rank 0's `execute` sends every step's inputs to
        the other ranks, whose own loop (engine/distributed/worker.py) runs the forward."""
        self.tp = tp
        self._last_contact = time.monotonic()  # the other ranks' last step or heartbeat
        # Run by close(): rank 0 stops the other ranks (engine/distributed/launch.py).
        self.on_close: list[Callable[[], None]] = []
        # None: the config's choice; "auto" becomes a concrete backend for the device here.
        self.attention_backend: str = resolve_attention_backend(
            attention_backend or model_config.attention_backend,
            resolve_device(model_config.device),
            cache_config.block_size,
        )
        logger.info("attention backend: %s", self.attention_backend)
        # --seed: requests without a seed of their own draw from torch's default generator,
        # which the engine process owns; seeding it makes a restarted server replay the same
        # unseeded samples for the same request order (as the reference server does).
        torch.manual_seed(model_config.seed)
        self.loaded: LoadedModel = load_model(
            model_config, attention_backend=self.attention_backend, tp=tp
        )
        self.device = self.loaded.device
        # --enable-lora: the fused projections get adapter slots (after the weights loaded).
        self.lora: LoRASlots | None = (
            LoRASlots(self.loaded.model, lora_config) if lora_config is not None else None
        )
        if self.lora is not None and tp.is_driver and tp.world_size > 1:
            self.lora.on_step = lambda slots, loads: send_lora_step(tp, slots, loads)
        self.block_size = cache_config.block_size
        # Layers grouped by attention type, each group with its own block tables: windowed
        # groups give back blocks behind their window (engine/kv_cache/groups.py).
        self.kv_groups = kv_cache_groups(
            getattr(self.loaded.model.dims, "layer_windows", ()), self.loaded.num_layers
        )
        self.kv_group_windows: tuple[int | None, ...] = self.kv_groups.windows
        # Per layer, the group whose metadata it reads (only with several groups).
        self._layer_group = self.kv_groups.layer_group
        # Pipeline stages allocate every layer's slot too (the stage's own would do).
        self.kv_spec = spec = KVCacheSpec(
            num_layers=self.kv_groups.num_slots,
            num_kv_heads=self.loaded.num_kv_heads,
            head_dim=self.loaded.head_dim,
            block_size=cache_config.block_size,
            dtype=self.loaded.dtype,
            quantized=cache_config.kv_cache_dtype == "int8",
            group_windows=self.kv_groups.windows,
        )
        if spec.quantized and self.device.type != "cpu":
            raise ValueError("--kv-cache-dtype int8 runs on the CPU backends only (the CUDA "
                             "kernels read bf16/fp16 caches)")
        self.sampler = Sampler(self.device)
        # Called after each forward with (requests, row_starts, final-norm hidden states,
        # output): an EAGLE head reads the target's features here (engine/spec_decode/eagle.py).
        self.hidden_state_hook: HiddenStateHook | None = None
        profiled_budget = None
        # The profile runs whole steps, which tensor-parallel ranks would have to run together.
        if tp.world_size == 1 and needs_memory_profile(cache_config, self.device):
            profiled_budget = self._profile_kv_budget(
                spec, cache_config.gpu_memory_utilization, max_num_seqs, max_num_batched_tokens
            )
        # One block table serves every rank: each holds the same block ids for its KV heads,
        # so all hold as many blocks as the tightest one can.
        self.num_blocks: int = all_reduce_min(tp, determine_num_blocks(
            spec,
            cache_config,
            device=self.device,
            max_model_len=self.loaded.max_model_len,
            max_num_seqs=max_num_seqs,
            profiled_budget_bytes=profiled_budget,
        ))
        # Per layer: its slot's tensor (layers of different groups share one).
        self.kv_caches: list[torch.Tensor] = self.kv_groups.layer_slots(
            self._allocate_slots(spec, self.num_blocks)
        )

    def _allocate_slots(self, spec: KVCacheSpec, num_blocks: int) -> list[torch.Tensor]:
        """The cache slots this rank's layers use: all of them, except on a pipeline stage,
        whose other stages' slots are left empty (zero blocks; no layer of it reads them)."""
        stage_layers = getattr(self.loaded.model, "stage_layers", None)
        if self.tp.num_stages == 1 or stage_layers is None:
            return allocate_kv_caches(spec, num_blocks, self.device)
        slot_of_layer = self.kv_groups.layer_slots(list(range(spec.num_layers)))
        used = sorted({slot_of_layer[layer] for layer in stage_layers})
        own = iter(allocate_kv_caches(replace(spec, num_layers=len(used)), num_blocks,
                                      self.device))
        empty = allocate_kv_caches(replace(spec, num_layers=1), 0, self.device)[0]
        return [next(own) if slot in used else empty for slot in range(spec.num_layers)]

    def _profile_kv_budget(
        self, spec: KVCacheSpec, utilization: float, max_num_seqs: int, max_num_batched_tokens: int
    ) -> int:
        """Bytes the KV cache may take: runs the worst steps once on a throwaway cache."""
        batches = profile_batches(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=self.loaded.max_model_len,
            block_size=self.block_size,
        )
        num_blocks = profile_num_blocks(batches)
        self.kv_caches = self.kv_groups.layer_slots(
            allocate_kv_caches(spec, num_blocks, self.device)
        )
        try:
            profile = profile_memory(
                self.device, batches, self.execute, num_blocks * spec.bytes_per_block
            )
        finally:
            self.kv_caches = []
            self.sampler.free([r.request_id for batch in batches for r in batch.requests])
            torch.cuda.empty_cache()
        logger.info("memory profile: %s", profile.describe(utilization))
        return profile.kv_cache_budget(utilization)

    def execute(self, batch: ScheduledBatch) -> ModelRunnerOutput:
        """Compute the scheduled tokens, then sample one token for every request with
        `sample=True`, reported in batch order."""
        self.sampler.free(batch.finished_request_ids)
        if batch.is_empty:
            return ModelRunnerOutput(request_ids=[], sampled_token_ids=[])
        with torch.inference_mode():
            inputs = prepare_inputs(
                batch, self.block_size, self.device, self.kv_groups.num_groups
            )
            # Built before the other ranks are sent the step: they are told its adapter rows
            # (LoRASlots.on_step) ahead of its FORWARD.
            lora_step = self._lora_step(batch, inputs.row_starts)
            if self.tp.world_size > 1:
                send_forward(self.tp, inputs.input_ids, inputs.positions, inputs.attn_metadata,
                             group_metadata=inputs.group_metadata)
                self._last_contact = time.monotonic()
            metadata = inputs.attn_metadata
            if inputs.group_metadata:  # each layer reads its own group's block tables
                metadata = self.layer_metadata(inputs.group_metadata)
            with lora_step:
                hidden = self.loaded.model(
                    inputs.input_ids, inputs.positions, self.kv_caches, metadata
                )
            # Prefill rows go through the vocab projection only for requests that ask for
            # prompt_logprobs; otherwise only sampling rows do.
            prompt_logprobs = score_prompt_chunks(
                batch.requests, inputs.row_starts, hidden, self.compute_logits
            )
            if not inputs.sample_requests:
                output = ModelRunnerOutput([], [], prompt_logprobs=prompt_logprobs)
            elif has_drafts(inputs.sample_requests):
                output = sample_with_drafts(
                    self.sampler, hidden, inputs.sample_requests, inputs.sample_rows.tolist(),
                    self.compute_logits,
                )
                output.prompt_logprobs = prompt_logprobs
            else:
                rows = (hidden if inputs.samples_every_row_in_order
                        else hidden.index_select(0, inputs.sample_rows))
                sampled = self.sampler.sample_with_logprobs(
                    self.compute_logits(rows), inputs.sample_requests)
                output = ModelRunnerOutput(
                    request_ids=[request.request_id for request in inputs.sample_requests],
                    sampled_token_ids=sampled.token_ids,
                    logprobs=sampled.logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
            if self.hidden_state_hook is not None:
                self.hidden_state_hook(batch.requests, inputs.row_starts, hidden, output)
        return output


    def keep_alive(self) -> None:
        """The core's loop calls this while idle: with other ranks, a heartbeat every
        HEARTBEAT_INTERVAL_S (raises RuntimeError when a rank is gone)."""
        if self.tp.world_size == 1 or not self.on_close:  # no ranks, or already stopped
            return
        if time.monotonic() - self._last_contact >= HEARTBEAT_INTERVAL_S:
            send_heartbeat(self.tp, HEARTBEAT_TIMEOUT_S)
            self._last_contact = time.monotonic()

    def close(self) -> None:
        for stop in self.on_close:
            stop()
        self.on_close = []

    def layer_metadata(
        self, group_metadata: Sequence[AttentionMetadata]
    ) -> list[AttentionMetadata]:
        """Each layer's metadata: its KV cache group's."""
        return [group_metadata[group] for group in self._layer_group]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of `hidden`'s rows; the other tensor-parallel ranks are sent the
        rows and compute their vocab slices alongside."""
        if self.tp.world_size > 1:
            send_logits_rows(self.tp, hidden)
        return self.loaded.model.compute_logits(hidden)

    def _lora_step(
        self, batch: ScheduledBatch, row_starts: list[int]
    ) -> AbstractContextManager[None]:
        if self.lora is None:
            return nullcontext()
        requests = batch.requests
        return self.lora.step(
            [r.lora for r in requests], row_starts, [r.num_tokens for r in requests]
        )

