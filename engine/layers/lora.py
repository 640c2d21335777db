"""A fused projection with LoRA slots: base(x) plus, for every row, its own adapter's
low-rank update, all adapters of a step in one batched shrink and one batched expand.

Weights of the `max_loras` resident adapters are stacked per projection; a projection of
n fused slices (qkv: 3, gate_up: 2, others: 1) keeps slice j's factors at ranks
[j*R, j*R + r) of R = max_lora_rank, B block-diagonal, so one matmul pair covers all slices:

    A: [slots, n*R, in]    B: [slots, out, n*R]    (zeros where an adapter has no target)

A step groups its adapted rows by slot (LoRAStep, built once per step by the runner), pads
each group to the longest and runs

    x[gather] [G, Tmax, in] @ A[slots]^T -> [G, Tmax, n*R] @ B[slots]^T -> [G, Tmax, out]

then adds the valid rows into the base output. Rows without an adapter are not touched.
This is plain torch (bmm over slot-stacked weights), not a native kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoRAStep:
    """How this step's rows map onto slots. Built by engine/lora/slots.py."""

    # Every row of the step uses this one slot: one plain matmul pair, no gather.
    whole_batch_slot: int | None
    slots: torch.Tensor  # [G] int64: the slots in use
    gather: torch.Tensor  # [G, Tmax] int64: each group's rows, padded with row 0
    valid: torch.Tensor  # [n_valid] int64: positions in the flattened [G*Tmax] that are real
    rows: torch.Tensor  # [n_valid] int64: the output row of each valid position


class LoRAContext:
    """Shared by every LoRALinear of a model: the step being computed (None: base only)."""

    def __init__(self) -> None:
        self.step: LoRAStep | None = None


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        slice_sizes: tuple[int, ...],
        in_features: int,
        *,
        max_loras: int,
        max_rank: int,
        context: LoRAContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.base = base
        self.slice_sizes = slice_sizes
        self.slice_offsets = tuple(sum(slice_sizes[:j]) for j in range(len(slice_sizes)))
        self.max_rank = max_rank
        self.context = context
        stacked_rank = len(slice_sizes) * max_rank
        out_features = sum(slice_sizes)
        self.lora_a = torch.zeros(max_loras, stacked_rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_loras, out_features, stacked_rank, dtype=dtype, device=device)

    # The fused decode path (models/fused_decode.py) reads the base projection's packed
    # weights; it only runs steps without adapter rows.
    @property
    def packing(self) -> str | None:
        return getattr(self.base, "packing", None)

    @property
    def packed_weight(self) -> torch.Tensor | None:
        return getattr(self.base, "packed_weight", None)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def set_slot(
        self, slot: int, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Write one adapter into `slot`: slice index -> (A [r, in], B [out_j, r]); slices
        it does not target are zeroed."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for index, (a, b) in factors.items():
            rank, first = a.shape[0], index * self.max_rank
            offset, size = self.slice_offsets[index], self.slice_sizes[index]
            self.lora_a[slot, first : first + rank].copy_(a)
            self.lora_b[slot, offset : offset + size, first : first + rank].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        step = self.context.step
        if step is None:
            return out
        if step.whole_batch_slot is not None:
            slot = step.whole_batch_slot
            return out.add_((x @ self.lora_a[slot].t()) @ self.lora_b[slot].t())
        grouped = x[step.gather]  # [G, Tmax, in]
        shrunk = torch.bmm(grouped, self.lora_a[step.slots].transpose(1, 2))
        expanded = torch.bmm(shrunk, self.lora_b[step.slots].transpose(1, 2))
        delta = expanded.reshape(-1, out.shape[-1]).index_select(0, step.valid)
        return out.index_add_(0, step.rows, delta)
