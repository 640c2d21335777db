"""RMSNorm with the same rounding as the Hugging Face reference."""
from __future__ import annotations

import torch
from torch import nn

from engine import family_ops, ops


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale by the weight.

    The cast happens before the weight multiply (as in transformers' LlamaRMSNorm), so bf16
    outputs round exactly like the reference model's.
    """

    def __init__(
        self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() == 2 and ops.fused_pointwise_available(hidden):
            return ops.rms_norm_bf16(hidden, self.weight, self.eps)
        return self.reference(hidden)

    def add_and_forward(self, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """`residual += delta` in place, then the norm of the sum (one pass where fused)."""
        if residual.dim() == 2 and ops.fused_pointwise_available(residual):
            return ops.rms_norm_bf16(residual, self.weight, self.eps, delta)
        residual += delta
        return self.reference(residual)

    def reference(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden_f32 = hidden.float()
        variance = hidden_f32.pow(2).mean(-1, keepdim=True)
        normed = hidden_f32 * torch.rsqrt(variance + self.eps)
        return self.weight * normed.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: checkpoints store w with the scale applied as (1 + w), and the
    product is taken in float32 before rounding (transformers' Gemma2RMSNorm), so bf16
    outputs round differently from Llama's: the native op has a Gemma mode for it."""

    # The stored weight of an identity scale (random-weight loads fill it in).
    unit_weight = 0.0

    def __init__(
        self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__(hidden_size, eps, dtype=dtype, device=device)
        self.weight.data.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() == 2 and ops.fused_pointwise_available(hidden):
            return family_ops.gemma_rms_norm_bf16(hidden, self.weight, self.eps)
        return self.reference(hidden)

    def add_and_forward(self, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if residual.dim() == 2 and ops.fused_pointwise_available(residual):
            return family_ops.gemma_rms_norm_bf16(residual, self.weight, self.eps, delta)
        residual += delta
        return self.reference(residual)

    def reference(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden_f32 = hidden.float()
        variance = hidden_f32.pow(2).mean(-1, keepdim=True)
        normed = hidden_f32 * torch.rsqrt(variance + self.eps)
        return (normed * (1.0 + self.weight.float())).to(hidden.dtype)
