"""W8A8 (compressed-tensors' int8 weights with dynamic per-token int8 activations): the torch
arithmetic of the scheme and the packing step of csrc/cpu/linear_w8a8.cpp's panels.

llm-compressor's W8A8 preset stores int8 weights with one float scale per output channel and
quantizes every Linear's input at run time, per token: scale = absmax / 127.5, a =
clamp(round(x / scale), -128, 127). `fake_quantize_per_token` is that step as
compressed-tensors computes it (in the activations' dtype), for the torch path; the native
kernel does the same in float32 and multiplies the integers exactly.
"""
from __future__ import annotations

import torch

from engine.ops import LINEAR_PANEL_ROWS

# The kernel's K step: one AMX tile row of int8 (also a multiple of VNNI's 4-byte quads).
W8A8_K_ALIGN = 64


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x quantized to int8 per token (last dim) and back, as compressed-tensors'
    forward_quantize does for dynamic symmetric "token" input activations."""
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = absmax / 127.5
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    return torch.round(x / scale).clamp(-128, 127) * scale


def pack_w8a8_panels(qweight: torch.Tensor, scale: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Q [N, K] int8 and per-channel scales [N, 1] -> linear_w8a8's panels uint8
    [ceil(N / 16), K_pad / 4, 64] (byte 4 r + j of step s = Q[16 p + r, 4 s + j] + 128, K_pad =
    K rounded up to 64, padding Q = 0) and float32 scales [ceil(N / 16) * 16] (rows past N 0)."""
    out_features, in_features = qweight.shape
    if scale.shape != (out_features, 1):
        raise ValueError(f"W8A8 needs one weight scale per output channel, got {tuple(scale.shape)}")
    num_panels = -(-out_features // LINEAR_PANEL_ROWS)
    padded_in = -(-in_features // W8A8_K_ALIGN) * W8A8_K_ALIGN
    unsigned = torch.full((num_panels * LINEAR_PANEL_ROWS, padded_in), 128, dtype=torch.int16)
    unsigned[:out_features, :in_features] = qweight.to(torch.int16) + 128
    # [P, 16, K / 4, 4] -> [P, K / 4, 16, 4]: each step holds 4 columns of the panel's 16 rows.
    quads = unsigned.view(num_panels, LINEAR_PANEL_ROWS, padded_in // 4, 4).permute(0, 2, 1, 3)
    packed = quads.reshape(num_panels, padded_in // 4, 4 * LINEAR_PANEL_ROWS).to(torch.uint8)
    scales = torch.zeros(num_panels * LINEAR_PANEL_ROWS, dtype=torch.float32)
    scales[:out_features] = scale[:, 0].float()
    return packed.contiguous(), scales
