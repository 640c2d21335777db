"""engine.ops' bfloat16 ops for the non-Llama families' layer parts, kept apart for size. Same
rules as engine.ops: callers check `ops.fused_pointwise_available(x)` first (the torch code
elsewhere is the reference). The per-op path and the fused decode layers
(engine/models/fused_decode.py) run these same kernels, so their outputs are bit-identical.

    op                        CPU (csrc/cpu, portable C++ or AVX-512)   elsewhere / no build
    rms_norm_bf16(gemma=...)  Gemma's (1 + w) RMSNorm, fp32 product     GemmaRMSNorm.reference
    head_norm_bf16_           per-head q/k RMSNorm in place             the norm modules
    gelu_tanh_and_mul_bf16    GeGLU over a fused [gate | up]            F.gelu(tanh) * up
    moe_route_bf16            softmax / top-k / renormalise / cast      engine.layers.moe.route
"""
from __future__ import annotations

import torch

from engine import ops


def _module():  # noqa: ANN202 - the extension module has no static type
    module = ops._cpu_module()
    assert module is not None, "check ops.fused_pointwise_available first"
    return module


def gemma_rms_norm_bf16(
    residual: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """Gemma's RMSNorm of residual [T, H] (after `residual += delta` in place when given)."""
    out = torch.empty(residual.shape, dtype=residual.dtype)
    _module().rms_norm_bf16(out, residual, delta, weight, eps, True)
    return out


def head_norm_bf16_(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> None:
    """RMSNorm of every head of x [T, heads, head_dim] in place (heads contiguous)."""
    _module().head_norm_bf16(x, weight, eps, gemma)


def gelu_tanh_and_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor:
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    _module().gelu_tanh_and_mul_bf16(out, gate_up)
    return out


def moe_route_bf16(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, float32_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 router_logits [T, E] -> (float32 weights [T, k], int64 expert ids [T, k]); the
    weights hold bf16 values unless `float32_weights` (engine.layers.moe.route's rules)."""
    rows = router_logits.shape[0]
    weights = torch.empty(rows, top_k, dtype=torch.float32)
    expert_ids = torch.empty(rows, top_k, dtype=torch.int64)
    _module().moe_route_bf16(weights, expert_ids, router_logits, renormalize, float32_weights)
    return weights, expert_ids
