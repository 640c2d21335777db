"""GGUF's K-quants (Q4_K, Q6_K: the Q4_K_M mix) on the int kernels without dequantizing.

A K-quant super-block of 256 weights holds small integer scales per sub-block and fp16
factors per super-block (ggml-quants.c; gguf.quants dequantizes them the same way):

    Q4_K  144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of
          32, 128 bytes of 4-bit q:          w = (d * sc) q - (dmin * m),  q in 0..15
    Q6_K  210 bytes: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales (sub-blocks
          of 16), fp16 d:                    w = (d * sc) (q - 32),        q in 0..63

Both map onto linear_int's panels losslessly: Q4_K as int4 values stored unsigned (q itself,
groups of 32, offset -(dmin * m)), Q6_K as 6-bit values (q - 32, groups of 16; the int4
layout of the low 4 bits plus 2 bits per weight). The two-level scales
stay two-level (`ops.linear_int_k_quant`): one byte per sub-block and an fp16 per super-block,
multiplied in registers, where d * sc and dmin * m are exact in float32 (an 11-bit mantissa
times an integer below 2^7), so every dequantized weight is gguf.quants' float32 value.
Resident: Q4_K 4.625 bits per weight (file 4.5), Q6_K 6.5625 (as the file).

A fused projection whose shards differ in type (Q4_K_M: q, k in Q4_K, v in Q6_K) is a
`KQuantLinear` of row segments, one kernel call each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import quantized_ops
from engine.layers.quant.panels import dequantize_first, pack_int_values, panel_order

SUPER_BLOCK = 256
K_QUANT_BYTES = {"Q4_K": 144, "Q6_K": 210}


@dataclass
class KQuantRows:
    """One tensor's blocks unpacked (rows x in_features weights)."""

    kind: str
    qweight: torch.Tensor  # int8 [rows, K]: Q4_K q - 8 (stored back as q), Q6_K q - 32
    scales: torch.Tensor  # uint8 (Q4_K) / int8 (Q6_K) [rows, K / group]
    mins: torch.Tensor | None  # uint8 [rows, K / 32] (Q4_K)
    d: torch.Tensor  # float16 [rows, K / 256]
    dmin: torch.Tensor | None  # float16 [rows, K / 256] (Q4_K)

    @property
    def bits(self) -> int:
        return 4 if self.kind == "Q4_K" else 6

    @property
    def group_size(self) -> int:
        return 32 if self.kind == "Q4_K" else 16

    def rows(self, index: torch.Tensor) -> KQuantRows:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return KQuantRows(self.kind, self.qweight[index], self.scales[index], pick(self.mins),
                          self.d[index], pick(self.dmin))

    @staticmethod
    def cat(parts: list[KQuantRows]) -> KQuantRows:
        """Row blocks of one kind stacked (fused shards of the same type)."""
        join = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        return KQuantRows(parts[0].kind, torch.cat([p.qweight for p in parts]),
                          torch.cat([p.scales for p in parts]), join([p.mins for p in parts]),
                          torch.cat([p.d for p in parts]), join([p.dmin for p in parts]))

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, K], as gguf.quants computes it."""
        group = self.group_size
        expand = lambda t: t.float().repeat_interleave(group, dim=1)  # noqa: E731
        sub = expand(self.scales)
        d = self.d.float().repeat_interleave(SUPER_BLOCK, dim=1)
        if self.kind == "Q4_K":
            assert self.mins is not None and self.dmin is not None
            dmin = self.dmin.float().repeat_interleave(SUPER_BLOCK, dim=1)
            return (d * sub) * (self.qweight.float() + 8) - dmin * expand(self.mins)
        return (d * sub) * self.qweight.float()


def unpack_k_quant(data: torch.Tensor, kind: str) -> KQuantRows:
    """A [rows, bytes] uint8 tensor of `kind` blocks -> its values and scales."""
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, K_QUANT_BYTES[kind])
    nb = blocks.shape[1]
    if kind == "Q4_K":
        d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(rows, nb)
        dmin = blocks[..., 2:4].contiguous().view(torch.float16).reshape(rows, nb)
        packed = blocks[..., 4:16].reshape(rows, nb, 3, 4).to(torch.int16)
        low, high, mixed = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
        sc = torch.cat((low & 0x3F, (mixed & 0x0F) | ((low >> 2) & 0x30)), dim=-1)
        mn = torch.cat((high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)), dim=-1)
        qs = blocks[..., 16:].reshape(rows, nb, 4, 1, 32).to(torch.int16)
        q = torch.cat((qs & 0x0F, qs >> 4), dim=3).reshape(rows, -1)
        return KQuantRows(kind, (q - 8).to(torch.int8), sc.reshape(rows, -1).to(torch.uint8),
                          mn.reshape(rows, -1).to(torch.uint8), d, dmin)
    ql = blocks[..., :128].reshape(rows, nb, 2, 1, 64).to(torch.int16)
    qh = blocks[..., 128:192].reshape(rows, nb, 2, 1, 32).to(torch.int16)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=3).reshape(rows, nb, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16).view(1, 1, 1, 4, 1)
    high = ((qh >> shifts) & 0x03).reshape(rows, nb, 8, 32)
    q = (low | (high << 4)).reshape(rows, -1) - 32
    scales = blocks[..., 192:208].contiguous().view(torch.int8).reshape(rows, -1)
    d = blocks[..., 208:210].contiguous().view(torch.float16).reshape(rows, nb)
    return KQuantRows(kind, q.to(torch.int8), scales, None, d, None)


class KQuantSegment(nn.Module):
    """Output rows [start, end) of a KQuantLinear, in one K-quant type's panels."""

    def __init__(self, start: int, values: KQuantRows) -> None:
        super().__init__()
        self.start = start
        self.out_features = values.qweight.shape[0]
        self.in_features = values.qweight.shape[1]
        self.kind = values.kind
        self.bits, self.group_size = values.bits, values.group_size
        self.groups_per_block = SUPER_BLOCK // values.group_size
        self.panels = pack_int_values(values.qweight, values.bits, values.group_size)
        self.scales = panel_order(values.scales)
        self.mins = None if values.mins is None else panel_order(values.mins)
        self.d = panel_order(values.d)
        self.dmin = None if values.dmin is None else panel_order(values.dmin)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dequantize = dequantize_first(x, self.in_features)  # prefill without AMX
        return quantized_ops.linear_int_k_quant(
            x, self.panels, self.bits, self.group_size, self.scales, self.mins, self.d,
            self.dmin, self.groups_per_block, bias, self.out_features,
            dequantize_first=dequantize)

    def resident_bytes(self) -> int:
        held = (self.panels, self.scales, self.mins, self.d, self.dmin)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


class KQuantLinear(nn.Module):
    """A projection held in its GGUF K-quant blocks (bfloat16 CPU kernels only)."""

    def __init__(self, segments: list[tuple[int, KQuantRows]], bias: torch.Tensor | None
                 ) -> None:
        super().__init__()
        self.segments = nn.ModuleList(KQuantSegment(start, values) for start, values in segments)
        self.in_features = self.segments[0].in_features
        self.out_features = sum(segment.out_features for segment in self.segments)
        self.bias = bias
        # Not "panels": the bf16-only fused decode path (models/fused_decode.py) declines.
        self.packing = "k_quant_panels"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for segment in self.segments:
            bias = None if self.bias is None else self.bias[
                segment.start:segment.start + segment.out_features]
            parts.append(segment(x, bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def resident_bytes(self) -> int:
        return sum(segment.resident_bytes() for segment in self.segments)

    def extra_repr(self) -> str:
        kinds = "+".join(segment.kind for segment in self.segments)
        return f"in={self.in_features}, out={self.out_features}, {kinds}"
