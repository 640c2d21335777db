"""The packing step of csrc/cpu/linear_int.cpp's panels, done once at load time."""
from __future__ import annotations

import torch

from engine.ops import LINEAR_PANEL_ROWS


def pack_int_panels(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q [N, K] int8 (values of a `bits`-bit signed integer) and scale [N, ceil(K /
    group_size)] -> linear_int's panels (csrc/cpu/linear_int.cpp): uint8 [ceil(N / 16), K / 2,
    4 * bits] in linear_bf16's pair-column order (int4: rows 8-15 of a panel in the high
    nibbles, offset by 8), and float32 scales [ceil(N / 16), groups, 16]; rows past N zero."""
    out_features, in_features = qweight.shape
    if in_features % 2 or group_size % 2:
        raise ValueError(f"linear_int needs an even in_features and group size, got "
                         f"{in_features} and {group_size}")
    if bits not in (4, 8):
        raise ValueError(f"linear_int packs 4- or 8-bit weights, got {bits}")
    num_panels = -(-out_features // LINEAR_PANEL_ROWS)
    rows = num_panels * LINEAR_PANEL_ROWS
    padded = qweight.new_zeros(rows, in_features)
    padded[:out_features] = qweight
    # [P, K / 2, 32]: element 2 r + j of a pair is row r, column j.
    pairs = padded.view(num_panels, LINEAR_PANEL_ROWS, in_features // 2, 2).permute(0, 2, 1, 3)
    pairs = pairs.reshape(num_panels, in_features // 2, 2 * LINEAR_PANEL_ROWS)
    if bits == 8:
        packed = pairs.contiguous().view(torch.uint8)
    else:
        unsigned = (pairs.to(torch.int16) + 8).to(torch.uint8)
        packed = (unsigned[..., :16] | (unsigned[..., 16:] << 4)).contiguous()
    scales = scale.new_zeros(rows, scale.shape[1], dtype=torch.float32)
    scales[:out_features] = scale
    scales = scales.view(num_panels, LINEAR_PANEL_ROWS, -1).permute(0, 2, 1).contiguous()
    return packed, scales
