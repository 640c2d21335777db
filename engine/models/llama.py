"""The Llama family (Llama, Mistral, Qwen2): one implementation over a flattened token batch.

At load time q/k/v are fused into one projection and gate/up into another: fewer, larger GEMMs
are markedly faster on CPU. Row layout of the fused weights:

    qkv_proj:     [ q: num_heads * D | k: num_kv_heads * D | v: num_kv_heads * D ]
    gate_up_proj: [ gate: intermediate | up: intermediate ]
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.layers.activation import silu_and_mul
from engine.layers.linear import Embedding, Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import (
    RotaryEmbedding,
    compute_inv_freq,
    read_rope_spec,
    rotate_in_place,
)
from engine.models.fused_decode import FusedDecodeLayers
from engine.models.weights import FusedWeightLoader


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype parameters are created."""

    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class LlamaDims:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> LlamaDims:
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        # Qwen2 always has q/k/v biases (and none on o_proj); Llama makes them optional.
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        qkv_bias = getattr(hf_config, "model_type", "") == "qwen2" or attention_bias
        return cls(
            hidden_size=hf_config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            vocab_size=hf_config.vocab_size,
            rms_norm_eps=hf_config.rms_norm_eps,
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )


class LlamaAttention(nn.Module):
    def __init__(
        self, dims: LlamaDims, attn_backend: AttentionBackend, placement: Placement
    ) -> None:
        super().__init__()
        self.num_heads = dims.num_heads
        self.num_kv_heads = dims.num_kv_heads
        self.head_dim = dims.head_dim
        self.q_size = dims.num_heads * dims.head_dim
        self.kv_size = dims.num_kv_heads * dims.head_dim
        self.scale = dims.head_dim**-0.5
        self.attn_backend = attn_backend
        self.qkv_proj = Linear(
            dims.hidden_size,
            self.q_size + 2 * self.kv_size,
            bias=dims.qkv_bias,
            dtype=placement.dtype,
            device=placement.device,
        )
        self.o_proj = Linear(
            self.q_size,
            dims.hidden_size,
            bias=dims.o_bias,
            dtype=placement.dtype,
            device=placement.device,
        )

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
        qk = rotate_in_place(qk, cos, signed_sin)
        query = qk[:, : self.num_heads]
        key = qk[:, self.num_heads :]
        value = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        attn = self.attn_backend.forward(query, key, value, kv_cache, attn_metadata, self.scale)
        return self.o_proj(attn.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, dims: LlamaDims, placement: Placement) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            dims.hidden_size,
            2 * dims.intermediate_size,
            bias=dims.mlp_bias,
            dtype=placement.dtype,
            device=placement.device,
        )
        self.down_proj = Linear(
            dims.intermediate_size,
            dims.hidden_size,
            bias=dims.mlp_bias,
            dtype=placement.dtype,
            device=placement.device,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, dims: LlamaDims, attn_backend: AttentionBackend, placement: Placement
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(dims, attn_backend, placement)
        self.mlp = LlamaMLP(dims, placement)
        self.input_layernorm = _rms_norm(dims, placement)
        self.post_attention_layernorm = _rms_norm(dims, placement)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # Residual adds happen in the activations' dtype, as in the reference model; the
        # second one is fused into the norm that follows it. `hidden` is this forward pass's
        # own activation (never a caller's tensor), so it is updated in place.
        normed = self.input_layernorm(hidden)
        attn = self.self_attn(normed, cos, signed_sin, kv_cache, attn_metadata)
        normed = self.post_attention_layernorm.add_and_forward(hidden, attn)
        return hidden + self.mlp(normed)


class LlamaModel(nn.Module):
    def __init__(
        self, dims: LlamaDims, attn_backend: AttentionBackend, placement: Placement
    ) -> None:
        super().__init__()
        self.embed_tokens = Embedding(
            dims.vocab_size, dims.hidden_size, dtype=placement.dtype, device=placement.device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(dims, attn_backend, placement) for _ in range(dims.num_layers)
        )
        self.norm = _rms_norm(dims, placement)


def _rms_norm(dims: LlamaDims, placement: Placement) -> RMSNorm:
    return RMSNorm(
        dims.hidden_size, dims.rms_norm_eps, dtype=placement.dtype, device=placement.device
    )


class LlamaForCausalLM(nn.Module):
    """Parameter names mirror the checkpoint's (`model.layers.N...`) except for the fused
    projections, so weight mapping is a handful of renames."""

    def __init__(
        self,
        hf_config: Any,
        *,
        attn_backend: AttentionBackend,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Parameters are created uninitialised; `load_weights` fills every one of them."""
        super().__init__()
        self.dims = LlamaDims.from_hf_config(hf_config)
        placement = Placement(dtype, device)
        self.model = LlamaModel(self.dims, attn_backend, placement)
        # Tied checkpoints have no lm_head tensor: the LM head reads the embedding matrix.
        self.lm_head = (
            None
            if self.dims.tie_word_embeddings
            else Linear(
                self.dims.hidden_size, self.dims.vocab_size, bias=False, dtype=dtype, device=device
            )
        )
        inv_freq = compute_inv_freq(read_rope_spec(hf_config), self.dims.head_dim)
        self.rotary = RotaryEmbedding(inv_freq, max_positions, device)
        # All decoder layers of a pure-decode bf16 CPU step in one native call, where it applies.
        self._fused_decode: FusedDecodeLayers | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-norm hidden states [T, hidden]."""
        hidden = self.model.embed_tokens(input_ids)
        cos, signed_sin = self.rotary.lookup(positions, hidden.dtype)
        if self._fused_decode is None:  # built at first use: after the weights are packed
            self._fused_decode = FusedDecodeLayers(self)
        if self._fused_decode.applies(hidden, attn_metadata):
            self._fused_decode.run(hidden, cos, signed_sin, kv_caches, attn_metadata)
            return self.model.norm(hidden)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, signed_sin, kv_cache, attn_metadata)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] of the rows that sample -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the fused parameters; raises ModelLoadError
        naming any parameter left unfilled."""
        dims = self.dims
        q_rows = dims.num_heads * dims.head_dim
        kv_rows = dims.num_kv_heads * dims.head_dim
        loader = FusedWeightLoader(
            dict(self.named_parameters()),
            fused_shards={
                "self_attn.q_proj": ("self_attn.qkv_proj", 0, q_rows),
                "self_attn.k_proj": ("self_attn.qkv_proj", q_rows, kv_rows),
                "self_attn.v_proj": ("self_attn.qkv_proj", q_rows + kv_rows, kv_rows),
                "mlp.gate_proj": ("mlp.gate_up_proj", 0, dims.intermediate_size),
                "mlp.up_proj": ("mlp.gate_up_proj", dims.intermediate_size, dims.intermediate_size),
            },
            ignored_suffixes=("rotary_emb.inv_freq",),
            ignored_names=("lm_head.weight",) if dims.tie_word_embeddings else (),
        )
        for name, tensor in weights:
            loader.load(name, tensor)
        loader.check_complete()
