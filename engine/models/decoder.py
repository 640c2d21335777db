"""Every generative family (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Gemma 2/3, Phi-3,
Granite, GPT-OSS): one decoder over a flattened token batch, its switches read into a DecoderSpec
(models/decoder_spec.py), its layers in models/decoder_layers.py.

Parameter names mirror the checkpoint's (`model.layers.N...`) except for the fused
projections and the experts, so weight mapping is a handful of renames.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engine import ops
from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.distributed.group import SINGLE, TensorParallel
from engine.distributed.pipeline import run_stage
from engine.distributed.sharding import (
    CheckpointSharder,
    shard_spec,
    stage_layers,
    vocab_shard_size,
)
from engine.errors import ModelLoadError
from engine.layers.linear import Embedding, Linear
from engine.layers.lora import LoRAContext
from engine.layers.quantized_linear import WeightQuant
from engine.layers.rotary import RotaryEmbedding, build_rotary
from engine.layers.vocab_parallel import VocabParallelEmbedding
from engine.models.decoder_layers import DecoderLayer, Placement, SparseMoE, make_norm
from engine.models.decoder_spec import DecoderSpec, read_decoder_spec
from engine.models.fused_decode import FusedDecodeLayers
from engine.models.weights import FusedWeightLoader


class DecoderModel(nn.Module):
    def __init__(
        self, spec: DecoderSpec, attn_backend: AttentionBackend, placement: Placement
    ) -> None:
        super().__init__()
        tp = placement.tp
        # Only pipeline stage 0 embeds (and computes logits); later stages get hidden states.
        self.embed_tokens: Embedding | VocabParallelEmbedding | None = (
            None if tp.stage > 0
            else Embedding(spec.vocab_size, spec.hidden_size,
                           dtype=placement.dtype, device=placement.device)
            if tp.size == 1
            else VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp,
                                        dtype=placement.dtype, device=placement.device)
        )
        own = stage_layers(spec.num_layers, tp)
        # Indexed as in the checkpoint; another stage's layers are empty placeholders.
        self.layers = nn.ModuleList(
            DecoderLayer(spec, index, attn_backend, placement) if index in own else nn.Module()
            for index in range(spec.num_layers)
        )
        self.norm = make_norm(spec, spec.hidden_size, placement)


class DecoderForCausalLM(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        *,
        attn_backend: AttentionBackend,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
        quantization: WeightQuant | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """Parameters are created uninitialised; `load_weights` fills every one of them.
        `quantization`: how the checkpoint stores its projections (compressed-tensors).
        `tp`: this rank's share of a tensor-parallel model (engine/distributed/sharding.py);
        `dims` then holds the rank's head and intermediate counts."""
        super().__init__()
        full_spec = read_decoder_spec(hf_config)
        if full_spec.moe is not None and full_spec.moe.gpt_oss and (
                tp.world_size > 1 or quantization is not None):
            # Its experts and sinks have no sharding rules or quantized form yet.
            raise ValueError("gpt_oss checkpoints are served unquantized on one rank only "
                             "(--tensor-parallel-size 1, --pipeline-parallel-size 1, "
                             "no quantization)")
        if tp.world_size > 1 and quantization is not None:
            raise ValueError("quantized checkpoints are not supported with "
                             "--tensor-parallel-size > 1")
        self.tp = tp
        self.dims = spec = shard_spec(full_spec, tp)
        self.sharder = CheckpointSharder(full_spec, tp)
        placement = Placement(dtype, device, quantization, tp)
        self.model = DecoderModel(spec, attn_backend, placement)
        # Tied checkpoints have no lm_head tensor: the LM head reads the embedding matrix.
        self.stage_layers = stage_layers(spec.num_layers, tp)
        self.num_stage_layers = len(self.stage_layers)
        self._dtype = dtype
        self.lm_head = (
            None
            if spec.tie_word_embeddings or tp.stage > 0
            else Linear(spec.hidden_size, vocab_shard_size(spec.vocab_size, tp), bias=False,
                        dtype=dtype, device=device)
        )
        # One table per RoPE setting in use (Gemma 3: local and global layers differ).
        self.rotary: dict[str, RotaryEmbedding] = {
            key: build_rotary(spec.rope_config(hf_config, key), spec.head_dim, max_positions, device)
            for key in dict.fromkeys(spec.layer_rope)
        }
        # Gemma multiplies by the scale rounded to the activations' dtype, Granite by the
        # Python float, as their reference models do; rounded once here, not every step.
        self._embed_scale = (
            float(torch.tensor(spec.embed_scale, dtype=dtype)) if spec.embed_scale_in_dtype
            else spec.embed_scale
        )
        # All decoder layers of a pure-decode bf16 CPU step in one native call, where it applies.
        self._fused_decode: FusedDecodeLayers | None = None
        # A tied LM head's panels for linear_bf16 (the embedding then reads from them too).
        self._tied_head: torch.Tensor | None = None
        # Set when LoRA is enabled (engine/lora/slots.py): the step's rows -> adapter slots.
        self.lora_context: LoRAContext | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata | Sequence[AttentionMetadata],
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-norm hidden states [T, hidden]. `attn_metadata`:
        one for every layer, or one per layer (KV cache groups: each layer reads its group's
        block tables). With pipeline stages, stage 0's return value alone is meaningful."""
        tp = self.tp
        if tp.num_stages > 1:  # micro-batches through the stages (distributed/pipeline.py)
            layer_metadata = (
                [attn_metadata] * len(kv_caches) if isinstance(attn_metadata, AttentionMetadata)
                else attn_metadata)
            hidden = run_stage(self, input_ids, positions, kv_caches, layer_metadata)
            if hidden is None:  # a later stage: only stage 0's return value is read
                return self.hidden_buffer(0, input_ids.device)
            return self.model.norm(hidden)
        hidden = self.embed(input_ids)
        if self._fused_decode is None and tp.world_size == 1:  # at first use: after packing
            self._fused_decode = FusedDecodeLayers(self)
            if self.lm_head is None and isinstance(self.model.embed_tokens, Embedding):
                self._tied_head = self.model.embed_tokens.pack_for_tied_head()
        # The fused layers read bf16 caches only (an int8 cache takes the per-op path), and
        # adapters only where they take the native LoRA kernel. Nor do they run collectives
        # (a tensor-parallel rank's partial sums need the per-op path's all_reduce after
        # attention and after the MLP) or hold a pipeline stage's layers: None then.
        lora_step = self.lora_context.step if self.lora_context is not None else None
        layer_metadata: Sequence[AttentionMetadata] = (
            [attn_metadata] * len(kv_caches) if isinstance(attn_metadata, AttentionMetadata)
            else attn_metadata)
        if (self._fused_decode is not None
                and self._fused_decode.applies(hidden, layer_metadata)
                and self._fused_decode.takes(lora_step)
                and kv_caches[0].dtype == hidden.dtype):
            rope = {key: rotary.lookup(positions, hidden.dtype)
                    for key, rotary in self.rotary.items()}
            self._fused_decode.run(hidden, rope, kv_caches, layer_metadata, lora_step)
            return self.model.norm(hidden)
        return self.model.norm(self.run_layers(hidden, positions, kv_caches, layer_metadata))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)  # type: ignore[misc]
        return hidden * self._embed_scale if self._embed_scale != 1.0 else hidden

    def hidden_buffer(self, rows: int, device: torch.device) -> torch.Tensor:
        """Room for `rows` hidden states received from another pipeline stage."""
        return torch.empty(rows, self.dims.hidden_size, dtype=self._dtype, device=device)

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor,
                   kv_caches: list[torch.Tensor],
                   layer_metadata: Sequence[AttentionMetadata]) -> torch.Tensor:
        """This stage's decoder layers over `hidden` (kv_caches and layer_metadata hold
        every layer; a pipeline stage runs its own)."""
        tables = {
            key: rotary.lookup(positions, hidden.dtype) for key, rotary in self.rotary.items()
        }
        for index in self.stage_layers:
            layer = self.model.layers[index]
            cos, signed_sin = tables[layer.rope_key]
            hidden = layer(hidden, cos, signed_sin, kv_caches[index], layer_metadata[index])
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] of the rows that sample -> float32 logits [N, vocab]. With
        tensor parallelism, rank 0's call gathers the other ranks' `contribute_logits`."""
        logits = self._gathered_logits(hidden)
        assert logits is not None, "only rank 0 computes the whole logits"
        spec = self.dims
        if spec.logits_divisor != 1.0:  # Granite
            logits = logits / spec.logits_divisor
        if spec.final_logit_soft_cap is not None:  # Gemma 2
            cap = spec.final_logit_soft_cap
            # In place (same roundings as tanh(logits / cap) * cap): at batch 16 the three
            # out-of-place [rows, vocab] ops cost more than the LM head itself.
            logits = logits.div(cap).tanh_().mul_(cap)
        return logits.float()

    def contribute_logits(self, hidden: torch.Tensor) -> None:
        """A tensor-parallel worker's part of rank 0's `compute_logits` (same hidden rows)."""
        self._gathered_logits(hidden)

    def _gathered_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """This rank's vocab columns, gathered side by side on rank 0 (None elsewhere)
        before any soft-capping, which must see each whole logit."""
        if self.lm_head is None:
            embedding = self.model.embed_tokens
            assert embedding is not None, "stage 0 computes the logits"
            if self._tied_head is not None:
                logits = ops.linear_bf16(hidden, self._tied_head, None, self.dims.vocab_size)
            else:
                logits = F.linear(hidden, embedding.weight)
        else:
            logits = self.lm_head(hidden)
        return self.tp.gather_columns(logits, self.dims.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the fused parameters and experts; raises
        ModelLoadError naming any parameter left unfilled."""
        spec = self.dims
        q_rows = spec.num_heads * spec.head_dim
        kv_rows = spec.num_kv_heads * spec.head_dim
        params = dict(self.named_parameters())
        experts = {
            f"model.layers.{index}.mlp.experts": layer.mlp.experts
            for index, layer in enumerate(self.model.layers)
            if isinstance(getattr(layer, "mlp", None), SparseMoE)
        }
        dense_params = {
            name: param for name, param in params.items()
            if not name.startswith(tuple(prefix + "." for prefix in experts))
        }
        loader = FusedWeightLoader(
            dense_params,
            fused_shards={
                "self_attn.q_proj": ("self_attn.qkv_proj", 0, q_rows),
                "self_attn.k_proj": ("self_attn.qkv_proj", q_rows, kv_rows),
                "self_attn.v_proj": ("self_attn.qkv_proj", q_rows + kv_rows, kv_rows),
                "mlp.gate_proj": ("mlp.gate_up_proj", 0, spec.intermediate_size),
                "mlp.up_proj": ("mlp.gate_up_proj", spec.intermediate_size, spec.intermediate_size),
            },
            # weight_shape: a quantized checkpoint's [out, in] record, implied by our layers.
            ignored_suffixes=("rotary_emb.inv_freq", ".weight_shape"),
            ignored_names=("lm_head.weight",) if spec.tie_word_embeddings else (),
        )
        for name, tensor in weights:
            for old, new in spec.renames:
                name = name.replace(old, new)
            if not self.sharder.keeps(name):
                continue  # another pipeline stage's
            tensor = self.sharder.narrow(name, tensor)
            prefix, _, rest = name.partition(".experts.")
            if rest and prefix + ".experts" in experts:
                from engine.layers.moe import expert_weight_target

                target = expert_weight_target("experts." + rest)
                if target is None:
                    raise ModelLoadError(f"checkpoint tensor {name} is not an expert weight")
                expert, projection = target
                experts[prefix + ".experts"].load_expert(expert, projection, tensor)
                continue
            loader.load(name, tensor)
        loader.check_complete()
        for prefix, module in experts.items():
            missing = module.missing_experts()
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise ModelLoadError(f"checkpoint is missing expert weights of {prefix}: {shown}")
