"""The packing step of csrc/cpu/linear_int.cpp's panels, done once at load time."""
from __future__ import annotations

import torch

from engine import ops
from engine.ops import LINEAR_PANEL_ROWS

# From this many rows on, a call is compute bound: where AMX runs, linear_int itself
# dequantizes two panels at a time into a per-thread scratch and multiplies them on AMX tiles
# (csrc/cpu/linear_int_prefill.cpp); elsewhere the call multiplies a transient bf16 copy of
# the whole weight with ops.linear_bf16 (`dequantize_first`). Below it linear_int's integer
# tiles stream fewer bytes.
DEQUANTIZE_ROWS = 16


def dequantize_first(x: torch.Tensor, in_features: int) -> bool:
    """Whether a call of `x` multiplies a transient bf16 copy of the whole weight: from
    DEQUANTIZE_ROWS rows where linear_int does not run them on AMX tiles itself."""
    rows = x.numel() // in_features
    if rows < DEQUANTIZE_ROWS:
        return False
    module = ops._cpu_module()
    return module is None or not bool(module.int_prefill_on_tiles(rows))


def kernel_supports(bits: int, in_features: int, group_size: int) -> bool:
    """Whether linear_int takes this shape: one 32-byte load holds 2 (int8) or 4 (int4)
    columns of a panel, so in_features and the group size must be multiples of that."""
    step = 2 if bits == 8 else 4
    return bits in (4, 6, 8) and in_features % step == 0 and group_size % step == 0


def pack_int_panels(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q [N, K] int8 (values of a `bits`-bit signed integer) and scale [N, ceil(K /
    group_size)] -> linear_int's panels (csrc/cpu/linear_int.cpp) and scales
    [ceil(N / 16), groups, 16] (`pack_group_values`), rows past N zero. Panels are uint8 [ceil(N / 16), K / 2, 32]
    for int8 (Q + 128, element 2 r + j of each 32 being row r, column j of a column pair) and
    [ceil(N / 16), K / 4, 32] for int4 (Q + 8; two column pairs per 32 bytes, the second in
    the high nibbles)."""
    return pack_int_values(qweight, bits, group_size), pack_group_values(scale)


def pack_int_values(qweight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The integer half of `pack_int_panels`: Q [N, K] -> linear_int's uint8 panels; bits 6
    (signed -32..31, Q6_K) -> [ceil(N / 16), K / 4, 48] (csrc/cpu/linear_int.cpp)."""
    out_features, in_features = qweight.shape
    if not kernel_supports(bits, in_features, group_size):
        raise ValueError(f"linear_int cannot take int{bits} weights of in_features "
                         f"{in_features} in groups of {group_size}")
    num_panels = -(-out_features // LINEAR_PANEL_ROWS)
    rows = num_panels * LINEAR_PANEL_ROWS
    offset = 2 ** (bits - 1)
    unsigned = torch.full((rows, in_features), offset, dtype=torch.int16)
    unsigned[:out_features] = qweight.to(torch.int16) + offset
    # [P, K / 2, 32]: element 2 r + j of a pair is row r, column j.
    pairs = unsigned.view(num_panels, LINEAR_PANEL_ROWS, in_features // 2, 2).permute(0, 2, 1, 3)
    pairs = pairs.reshape(num_panels, in_features // 2, 2 * LINEAR_PANEL_ROWS).to(torch.uint8)
    if bits == 8:
        return pairs.contiguous()
    two = pairs.view(num_panels, in_features // 4, 2, 2 * LINEAR_PANEL_ROWS)
    low = (two[:, :, 0] & 0x0F) | ((two[:, :, 1] & 0x0F) << 4)
    if bits == 4:
        return low.contiguous()
    # 6 bits (GGUF Q6_K): the low 4 bits as int4's, then per 4 columns 16 bytes of the high 2:
    # byte b = pair 0 lane b | pair 1 lane b << 2 | pair 0 lane b + 16 << 4 | pair 1 ... << 6.
    high = two >> 4
    half = LINEAR_PANEL_ROWS
    top = (high[:, :, 0, :half] | (high[:, :, 1, :half] << 2)
           | (high[:, :, 0, half:] << 4) | (high[:, :, 1, half:] << 6))
    return torch.cat((low, top), dim=-1).contiguous()


def panel_order(values: torch.Tensor) -> torch.Tensor:
    """Per (row, column block) values [N, B] of any dtype -> [ceil(N / 16), B, 16], rows past
    N zero: the order the kernels read 16 rows' values of one block in."""
    out_features = values.shape[0]
    num_panels = -(-out_features // LINEAR_PANEL_ROWS)
    padded = values.new_zeros(num_panels * LINEAR_PANEL_ROWS, values.shape[1])
    padded[:out_features] = values
    return padded.view(num_panels, LINEAR_PANEL_ROWS, -1).permute(0, 2, 1).contiguous()


def pack_group_values(values: torch.Tensor) -> torch.Tensor:
    """Per (row, group) floats [N, groups] (scales, offsets) -> the panels' order
    [ceil(N / 16), groups, 16], rows past N zero: float16 where every value is exactly one
    (GGUF's, GPTQ's and AWQ's scales are stored so; two bytes less streamed per group),
    else float32."""
    out_features = values.shape[0]
    num_panels = -(-out_features // LINEAR_PANEL_ROWS)
    exact_half = bool(torch.equal(values.float().half().float(), values.float()))
    padded = torch.zeros(num_panels * LINEAR_PANEL_ROWS, values.shape[1],
                         dtype=torch.float16 if exact_half else torch.float32)
    padded[:out_features] = values
    return padded.view(num_panels, LINEAR_PANEL_ROWS, -1).permute(0, 2, 1).contiguous()


def dequantize_panels(packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                      out_features: int, in_features: int,
                      offsets: torch.Tensor | None = None) -> torch.Tensor:
    """linear_int's panels -> linear_bf16's bf16 panels [ceil(N / 16), K / 2, 16, 2], each
    weight rounded as torch's `(Q.float() * scale).to(bfloat16)` (with offsets: the fused
    Q * scale + offset); only call where `ops.linear_bf16_available()`."""
    module = ops._cpu_module()
    assert module is not None
    panels = torch.empty(packed.shape[0], in_features // 2, LINEAR_PANEL_ROWS, 2,
                         dtype=torch.bfloat16)
    rows = torch.empty(0, in_features, dtype=torch.bfloat16)
    module.linear_int(torch.empty(0, out_features, dtype=torch.bfloat16), rows, packed, scales,
                      None, bits, group_size, panels, offsets)
    return panels
