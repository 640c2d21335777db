"""Gated activation over a fused gate/up projection."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from engine import family_ops, ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` where `gate_up = [gate | up]` along the last dimension."""
    if gate_up.dim() == 2 and ops.fused_pointwise_available(gate_up):
        return ops.silu_and_mul_bf16(gate_up)
    intermediate_size = gate_up.shape[-1] // 2
    gate = gate_up[..., :intermediate_size]
    up = gate_up[..., intermediate_size:]
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh(gate) * up` (GeGLU, Gemma's MLP), same layout as `silu_and_mul`."""
    if gate_up.dim() == 2 and ops.fused_pointwise_available(gate_up):
        return family_ops.gelu_tanh_and_mul_bf16(gate_up)
    intermediate_size = gate_up.shape[-1] // 2
    gate = gate_up[..., :intermediate_size]
    up = gate_up[..., intermediate_size:]
    return F.gelu(gate, approximate="tanh") * up


GATED_ACTIVATIONS = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}
