"""One decoder layer of any supported family over a flattened token batch.

At load time q/k/v are fused into one projection and gate/up into another: fewer, larger GEMMs
are markedly faster on CPU (Phi-3 checkpoints arrive fused already). Row layout:

    qkv_proj:     [ q: num_heads * D | k: num_kv_heads * D | v: num_kv_heads * D ]
    gate_up_proj: [ gate: intermediate | up: intermediate ]

A layer's MLP is dense or, for mixture-of-experts families, a router plus fused experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import family_ops, ops
from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.distributed.group import SINGLE, TensorParallel
from engine.distributed.sharding import local_experts
from engine.layers.activation import GATED_ACTIVATIONS
from engine.layers.linear import Linear
from engine.layers.quantized_linear import WeightQuant, make_linear
from engine.layers.norm import GemmaRMSNorm, RMSNorm
from engine.layers.rotary import rotate_in_place
from engine.models.decoder_spec import DecoderSpec, MoESpec
from engine.models.gpt_oss_layers import Float32ScaleRMSNorm, GptOssMoE


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype parameters are created."""

    dtype: torch.dtype
    device: torch.device
    # The checkpoint's stored weight quantization (projections built quantized), or None.
    quant: WeightQuant | None = None
    # This rank's share (the spec's sizes are already divided): row-parallel outputs are
    # summed over the ranks.
    tp: TensorParallel = SINGLE


def make_norm(spec: DecoderSpec, size: int, placement: Placement) -> RMSNorm:
    norm_class: type[RMSNorm] = (
        GemmaRMSNorm if spec.gemma_norm
        else Float32ScaleRMSNorm if spec.norm_scale_in_float32 else RMSNorm)
    return norm_class(size, spec.rms_norm_eps, dtype=placement.dtype, device=placement.device)


class DecoderAttention(nn.Module):
    def __init__(
        self,
        spec: DecoderSpec,
        layer_index: int,
        attn_backend: AttentionBackend,
        placement: Placement,
    ) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.scale
        self.attn_backend = attn_backend
        # Only options a layer really has are passed, so the base shape's call is unchanged.
        self.attn_options: dict[str, float | int] = {}
        if spec.layer_windows[layer_index] is not None:
            self.attn_options["sliding_window"] = spec.layer_windows[layer_index]
        if spec.attn_soft_cap is not None:
            self.attn_options["soft_cap"] = spec.attn_soft_cap
        self.qkv_proj = make_linear(
            spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias,
            dtype=placement.dtype, device=placement.device, quant=placement.quant,
        )
        self.o_proj = make_linear(
            self.q_size, spec.hidden_size, bias=spec.o_bias,
            dtype=placement.dtype, device=placement.device, quant=placement.quant,
        )
        self.tp = placement.tp
        self.q_norm = make_norm(spec, spec.head_dim, placement) if spec.qk_norm else None
        self.k_norm = make_norm(spec, spec.head_dim, placement) if spec.qk_norm else None
        # GPT-OSS: one learned logit per head joins every softmax denominator.
        self.sinks: nn.Parameter | None = (
            nn.Parameter(torch.empty(spec.num_heads, dtype=placement.dtype,
                                     device=placement.device), requires_grad=False)
            if spec.attn_sinks else None)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        qk_size = self.q_size + self.kv_size
        # q and k are adjacent in the fused output: rotate both with one set of ops.
        qk = qkv[:, :qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            # Per-head norms before RoPE (Qwen3, Gemma 3), written back into the fused rows
            # (in place by the native op: the fused decode layers run the same one).
            if ops.fused_pointwise_available(qk):
                gemma = isinstance(self.q_norm, GemmaRMSNorm)
                family_ops.head_norm_bf16_(qk[:, : self.num_heads], self.q_norm.weight,
                                           self.q_norm.eps, gemma)
                family_ops.head_norm_bf16_(qk[:, self.num_heads :], self.k_norm.weight,
                                           self.k_norm.eps, gemma)
            else:
                qk[:, : self.num_heads] = self.q_norm(qk[:, : self.num_heads])
                qk[:, self.num_heads :] = self.k_norm(qk[:, self.num_heads :])
        qk = rotate_in_place(qk, cos, signed_sin)
        query = qk[:, : self.num_heads]
        key = qk[:, self.num_heads :]
        value = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.sinks is not None:
            attn = self.attn_backend.forward(
                query, key, value, kv_cache, attn_metadata, self.scale, sinks=self.sinks,
                **self.attn_options)
        else:
            attn = self.attn_backend.forward(
                query, key, value, kv_cache, attn_metadata, self.scale, **self.attn_options)
        return self.tp.all_reduce(self.o_proj(attn.reshape(num_tokens, self.q_size)))


class DecoderMLP(nn.Module):
    def __init__(self, spec: DecoderSpec, placement: Placement) -> None:
        super().__init__()
        self.act_and_mul = GATED_ACTIVATIONS[spec.activation]
        self.gate_up_proj = make_linear(
            spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias,
            dtype=placement.dtype, device=placement.device, quant=placement.quant,
        )
        self.down_proj = make_linear(
            spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias,
            dtype=placement.dtype, device=placement.device, quant=placement.quant,
        )

        self.tp = placement.tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.act_and_mul(self.gate_up_proj(hidden))))


class SparseMoE(nn.Module):
    """Router (`gate`, as checkpoints name it) and the layer's experts."""

    def __init__(self, spec: DecoderSpec, moe: MoESpec, placement: Placement) -> None:
        # Imported here: dense families never load the experts' module (or its kernel).
        from engine.layers.moe import FusedExperts, MoERouting

        super().__init__()
        self.gate = Linear(
            spec.hidden_size, moe.num_experts, bias=False,
            dtype=placement.dtype, device=placement.device,
        )
        held = local_experts(moe.num_experts, placement.tp)
        self.experts = FusedExperts(
            len(held), spec.hidden_size, moe.intermediate_size,
            MoERouting(moe.num_experts, moe.top_k, moe.renormalize, moe.float32_weights),
            dtype=placement.dtype, device=placement.device, first_expert=held.start,
        )
        self.tp = placement.tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Each rank's experts hold a slice of every expert's intermediate dim, or (expert
        # parallelism) whole experts: either way a partial sum of every token's output.
        return self.tp.all_reduce(self.experts(hidden, self.gate(hidden)))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        spec: DecoderSpec,
        layer_index: int,
        attn_backend: AttentionBackend,
        placement: Placement,
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(spec, layer_index, attn_backend, placement)
        moe = spec.moe
        self.mlp: nn.Module = (
            DecoderMLP(spec, placement) if moe is None or layer_index not in moe.sparse_layers
            else GptOssMoE(spec, moe, placement.dtype, placement.device) if moe.gpt_oss
            else SparseMoE(spec, moe, placement)
        )
        self.input_layernorm = make_norm(spec, spec.hidden_size, placement)
        self.post_attention_layernorm = make_norm(spec, spec.hidden_size, placement)
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(spec, spec.hidden_size, placement)
            self.post_feedforward_layernorm = make_norm(spec, spec.hidden_size, placement)
        self.residual_multiplier = spec.residual_multiplier
        self.rope_key = spec.layer_rope[layer_index]

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # Residual adds happen in the activations' dtype, as in the reference models.
        normed = self.input_layernorm(hidden)
        attn = self.self_attn(normed, cos, signed_sin, kv_cache, attn_metadata)
        if self.sandwich:
            # Gemma: the attention output is normed before the residual add, the MLP input
            # and output too (post_attention_layernorm is the first of these, by name).
            hidden = hidden + self.post_attention_layernorm(attn)
            mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden))
            return hidden + self.post_feedforward_layernorm(mlp_out)
        if self.residual_multiplier != 1.0:
            attn = attn * self.residual_multiplier
        # The residual add is fused into the norm that follows it. `hidden` is this forward
        # pass's own activation (never a caller's tensor), so it is updated in place.
        normed = self.post_attention_layernorm.add_and_forward(hidden, attn)
        mlp_out = self.mlp(normed)
        if self.residual_multiplier != 1.0:
            mlp_out = mlp_out * self.residual_multiplier
        return hidden + mlp_out
