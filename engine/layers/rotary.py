"""Rotary position embeddings (RoPE) in the rotate-half layout used by Llama-family checkpoints.

The cos/sin table is computed once per model in float32 for every position the model may
see, and each step gathers the rows of its positions once (shared by all layers).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from engine import ops

_DEFAULT_THETA = 10000.0
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE settings of a checkpoint, normalised from either config layout."""

    theta: float
    rope_type: str
    scaling: Mapping[str, Any]


def read_rope_spec(hf_config: Any) -> RopeSpec:
    """Accept both `rope_parameters: {rope_theta, rope_type, ...}` (transformers 5) and the older
    top-level `rope_theta` with an optional `rope_scaling: {type|rope_type, factor, ...}`."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or _DEFAULT_THETA)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return RopeSpec(theta=float(theta), rope_type=str(rope_type), scaling=params)


def compute_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, with the checkpoint's scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (spec.theta**exponents)
    if spec.rope_type == "default":
        return inv_freq
    if spec.rope_type == "linear":
        return inv_freq / float(spec.scaling["factor"])
    if spec.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, spec.scaling)
    raise ValueError(
        f"unsupported rope_type {spec.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are divided by `factor`, short ones kept, and the
    band in between is interpolated smoothly."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """float32 tables [max_positions, head_dim] of cos and of sign-folded sin.

    The reference rotates x = [x1 | x2] as x * cos + [-x2 | x1] * sin. Folding the sign into
    the table, [-sin | sin], turns the rotation into x * cos + roll(x, half) * signed_sin: one
    op fewer per layer and bit-identical (a sign flip is exact).
    """

    def __init__(
        self, inv_freq: torch.Tensor, max_positions: int, device: torch.device | str
    ) -> None:
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())
        self.cos_cache = torch.cat((freqs, freqs), dim=-1).cos().to(device)
        half_sin = freqs.sin()
        self.signed_sin_cache = torch.cat((-half_sin, half_sin), dim=-1).to(device)
        self.max_positions = max_positions

    def lookup(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [T, 1, head_dim] for the step's positions, in the activations'
        dtype (the reference also rounds its tables to that dtype before rotating)."""
        cos = self.cos_cache.index_select(0, positions).to(dtype).unsqueeze(1)
        signed_sin = self.signed_sin_cache.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, signed_sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, num_heads, head_dim] by the per-token angles from `RotaryEmbedding.lookup`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary`, written into x itself where the fused bf16 kernel runs (x may be a
    strided view into the fused qkv projection; its heads must be contiguous)."""
    if ops.fused_pointwise_available(x) and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return ops.rotary_bf16_(x, cos, signed_sin)
    return apply_rotary(x, cos, signed_sin)
