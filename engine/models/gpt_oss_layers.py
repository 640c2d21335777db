"""GPT-OSS's own pieces of the shared decoder (models/decoder_layers.py): its RMSNorm and its
mixture of experts.

The experts run per-op in torch, in the checkpoint's layout, mirroring transformers'
GptOssExperts op for op so bf16 outputs round the same way; the native fused-experts kernel
(csrc/cpu/moe_bf16.cpp) has no expert biases or clamped SwiGLU yet. Layout per layer:

    experts.gate_up_proj       [E, hidden, 2 * I]  columns interleaved: gate 0, up 0, gate 1, ...
    experts.gate_up_proj_bias  [E, 2 * I]
    experts.down_proj          [E, I, hidden]
    experts.down_proj_bias     [E, hidden]
    router.weight [E, hidden], router.bias [E]
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.layers.norm import RMSNorm
from engine.models.decoder_spec import DecoderSpec, MoESpec


class Float32ScaleRMSNorm(RMSNorm):
    """RMSNorm whose weight multiplies the float32 normalised rows before the cast back
    (GptOssRMSNorm); the native bf16 norm rounds first, so this one always runs in torch."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.reference(hidden)

    def add_and_forward(self, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        residual += delta
        return self.reference(residual)

    def reference(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden_f32 = hidden.float()
        variance = hidden_f32.pow(2).mean(-1, keepdim=True)
        normed = hidden_f32 * torch.rsqrt(variance + self.eps)
        return (self.weight * normed).to(hidden.dtype)


class GptOssExperts(nn.Module):
    def __init__(self, spec: DecoderSpec, moe: MoESpec, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        experts, hidden, inter = moe.num_experts, spec.hidden_size, moe.intermediate_size

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device),
                                requires_grad=False)

        self.gate_up_proj = param(experts, hidden, 2 * inter)
        self.gate_up_proj_bias = param(experts, 2 * inter)
        self.down_proj = param(experts, inter, hidden)
        self.down_proj_bias = param(experts, hidden)
        self.alpha = moe.swiglu_alpha
        self.limit = moe.swiglu_limit

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        # Clamped SwiGLU: gate capped above, up clamped both sides, (up + 1) * gate * sigmoid.
        gate = gate_up[..., ::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for expert in torch.unique(indices).tolist():
            token_rows, slots = torch.where(indices == expert)
            gate_up = hidden[token_rows] @ self.gate_up_proj[expert] + self.gate_up_proj_bias[expert]
            expert_out = (self.activation(gate_up) @ self.down_proj[expert]
                          + self.down_proj_bias[expert])
            out.index_add_(0, token_rows,
                           (expert_out * weights[token_rows, slots, None]).to(hidden.dtype))
        return out


class GptOssRouter(nn.Module):
    def __init__(self, spec: DecoderSpec, moe: MoESpec, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.top_k = moe.top_k
        self.weight = nn.Parameter(
            torch.empty(moe.num_experts, spec.hidden_size, dtype=dtype, device=device),
            requires_grad=False)
        self.bias = nn.Parameter(torch.empty(moe.num_experts, dtype=dtype, device=device),
                                 requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (expert indices [T, k], their weights [T, k]): a softmax over the k largest
        logits in the activations' dtype, not over all experts."""
        logits = F.linear(hidden, self.weight, self.bias)
        top_logits, indices = torch.topk(logits, self.top_k, dim=-1)
        return indices, torch.softmax(top_logits, dim=-1, dtype=top_logits.dtype)


class GptOssMoE(nn.Module):
    def __init__(self, spec: DecoderSpec, moe: MoESpec, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.router = GptOssRouter(spec, moe, dtype, device)
        self.experts = GptOssExperts(spec, moe, dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        indices, weights = self.router(hidden)
        return self.experts(hidden, indices, weights)
