"""Rotary position embeddings (RoPE) in the rotate-half layout used by Llama-family checkpoints.

The cos/sin table is computed once per model in float32 for every position the model may
see, and each step gathers the rows of its positions once (shared by all layers). The scaling
types and how `dynamic` / `longrope` are served with one table live in `rope_scaling`.
With partial rotary (`partial_rotary_factor` < 1, or `rotary_dim`) the tables are rotary_dim
wide: the first rotary_dim dims of each head rotate (rotate-half over rotary_dim), the rest
pass through.
"""
from __future__ import annotations

from typing import Any

import torch

from engine import ops
from engine.layers.rope_scaling import (
    SUPPORTED_ROPE_TYPES,
    RopeSpec,
    read_rope_spec,
    rope_frequencies,
    rotary_dim_of,
)

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "RopeSpec",
    "RotaryEmbedding",
    "apply_rotary",
    "build_rotary",
    "compute_inv_freq",
    "read_rope_spec",
    "rotary_dim_of",
    "rotate_in_place",
]


def compute_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] in float32, with the checkpoint's scaling applied
    (without its attention scaling and with LongRoPE's short factors: `build_rotary` has both)."""
    return rope_frequencies(spec, head_dim)[0]


class RotaryEmbedding:
    """float32 tables [max_positions, rotary_dim] of cos and of sign-folded sin.

    The reference rotates x = [x1 | x2] as x * cos + [-x2 | x1] * sin. Folding the sign into
    the table, [-sin | sin], turns the rotation into x * cos + roll(x, half) * signed_sin: one
    op fewer per layer and bit-identical (a sign flip is exact). YaRN's and LongRoPE's
    attention scaling multiplies both tables, as transformers does before rounding them to the
    activations' dtype.
    """

    def __init__(
        self,
        inv_freq: torch.Tensor,
        max_positions: int,
        device: torch.device | str,
        attention_scaling: float = 1.0,
    ) -> None:
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        half_sin = freqs.sin()
        signed_sin = torch.cat((-half_sin, half_sin), dim=-1)
        cos = emb.cos()
        if attention_scaling != 1.0:
            cos = cos * attention_scaling
            signed_sin = signed_sin * attention_scaling
        self.cos_cache = cos.to(device)
        self.signed_sin_cache = signed_sin.to(device)
        self.max_positions = max_positions
        self.attention_scaling = attention_scaling

    @property
    def rotary_dim(self) -> int:
        return self.cos_cache.shape[-1]

    def lookup(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [T, 1, rotary_dim] for the step's positions, in the activations'
        dtype (the reference also rounds its tables to that dtype before rotating)."""
        cos = self.cos_cache.index_select(0, positions).to(dtype).unsqueeze(1)
        signed_sin = self.signed_sin_cache.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, signed_sin


def build_rotary(
    hf_config: Any, head_dim: int, max_positions: int, device: torch.device | str
) -> RotaryEmbedding:
    """The rotary tables of a checkpoint, for positions [0, max_positions) (the served length,
    which also picks LongRoPE's long or short factors). Bad RoPE settings raise ValueError
    naming the config field."""
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive integer, got {max_positions!r}")
    spec = read_rope_spec(hf_config)
    inv_freq, attention_scaling = rope_frequencies(spec, head_dim, max_positions)
    return RotaryEmbedding(inv_freq, max_positions, device, attention_scaling)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, num_heads, head_dim] by the per-token angles from `RotaryEmbedding.lookup`;
    with tables narrower than head_dim only the first rotary_dim dims rotate."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + x.roll(rotary_dim // 2, dims=-1) * signed_sin
    x_rot = x[..., :rotary_dim]
    rotated = x_rot * cos + x_rot.roll(rotary_dim // 2, dims=-1) * signed_sin
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary`, written into x itself where the fused bf16 kernel runs (x may be a
    strided view into the fused qkv projection; its heads must be contiguous). The kernel
    rotates whole heads, so partial rotary takes the torch path."""
    if (
        cos.shape[-1] == x.shape[-1]
        and ops.fused_pointwise_available(x)
        and x.stride(-1) == 1
        and x.stride(-2) == x.shape[-1]
    ):
        return ops.rotary_bf16_(x, cos, signed_sin)
    return apply_rotary(x, cos, signed_sin)
