"""engine.ops' quantized linear ops beyond linear_int, kept apart for size. Same rules as
engine.ops: callers check the `_available` functions, the extension is built on first use.

    op                    CPU (csrc/cpu)                          elsewhere / no build
    linear_int_k_quant    native (AVX512_BF16): GGUF Q4_K, Q6_K   (weights kept dequantized)
    linear_w8a8 (W8A8)    native: AMX-INT8, AVX512-VNNI or the    (fake-quantize x per token,
                          portable C++ (set_w8a8_kernel)           dequantize, F.linear)
"""
from __future__ import annotations

import torch

from engine import ops


def linear_int_k_quant(x: torch.Tensor, packed: torch.Tensor, bits: int, group_size: int,
                       scales: torch.Tensor, mins: torch.Tensor | None, d: torch.Tensor,
                       dmin: torch.Tensor | None, groups_per_block: int,
                       bias: torch.Tensor | None, out_features: int, *,
                       dequantize_first: bool = False) -> torch.Tensor:
    """linear_int over GGUF K-quant weights (layers/quant/k_quants.py): per (row, group)
    scale d * scales (and offset -(dmin * mins), values then unsigned), d / dmin one fp16
    per `groups_per_block` groups. `dequantize_first`: bf16 panels, then linear_bf16 (the
    compute-bound prefill path). Only call where `linear_bf16_available()`."""
    module = ops._cpu_module()
    assert module is not None
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    if dequantize_first:
        weight = torch.empty(packed.shape[0], rows.shape[1] // 2, ops.LINEAR_PANEL_ROWS, 2,
                             dtype=torch.bfloat16)
        module.linear_int_k_quant(out[:0], rows[:0], packed, bits, group_size, scales, mins, d,
                                  dmin, groups_per_block, None, weight)
        module.linear_bf16(out, rows, weight, bias)
    else:
        module.linear_int_k_quant(out, rows, packed, bits, group_size, scales, mins, d, dmin,
                                  groups_per_block, bias, None)
    return out.view(*x.shape[:-1], out_features)


def linear_w8a8_available() -> bool:
    """True where `linear_w8a8` runs: any CPU build (its scalar kernel needs no AVX-512)."""
    return ops._cpu_module() is not None


def linear_w8a8(x: torch.Tensor, packed: torch.Tensor, weight_scales: torch.Tensor,
                bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [..., K] bfloat16, quantized per token to int8 inside, . Q^T * scales (+ bias), Q and
    scales packed by layers/quant/w8a8.py; only call where `linear_w8a8_available()`."""
    module = ops._cpu_module()
    assert module is not None
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    module.linear_w8a8(out, rows, packed, weight_scales, bias)
    return out.view(*x.shape[:-1], out_features)
