"""A fused projection with LoRA slots: base(x) plus, for every row, its own adapter's
low-rank update, every adapter of a step in one shrink and one expand matmul.

Weights of the `max_loras` resident adapters are stacked per projection; a projection of
n fused slices (qkv: 3, gate_up: 2, others: 1) keeps slice j's factors at ranks
[j*R, j*R + r) of R = max_lora_rank, B block-diagonal, so one matmul pair covers all slices:

    A:   [slots * n*R, in]     (slot s at rows s*n*R ..)
    B^T: [slots * n*R, out]    (zeros where an adapter has no target)

A step with rows of several adapters (or of the base model too) shrinks every row against
all slots at once, zeroes the columns of the slots that are not the row's own (LoRAStep's
[T, slots] 0/1 mask; a base-model row is all zeros) and expands into the base output:

    out += ((x @ A^T) * mask) @ B^T        [T, slots*n*R] -> [T, out]

Three kernels per projection whatever the mix, rather than gathers and scatters per
adapter; the price is shrink/expand work for every slot and every row, base rows included.
A step of one adapter only uses its own slot's factors.

That torch path serves float32 (the exact reference the peft tests compare against) and
builds without the native ops. In bfloat16 on the CPU with them, `ops.lora_bf16` takes every
step instead: rows gathered by slot (LoRAStep.row_slots), each shrunk and expanded against
its own adapter only, on the slices it targets (`ranks`) and its own rank, added into the
base output in place; base rows cost nothing. The fused decode path
(models/fused_decode.py) runs the same kernel after each projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import ops


@dataclass(frozen=True)
class LoRAStep:
    """How this step's rows map onto slots. Built by engine/lora/slots.py."""

    # Every row of the step uses this one slot: its own factors only, no mask.
    whole_batch_slot: int | None
    # [T, slots], the activations' dtype: 1 where the row's adapter sits in the slot.
    slot_mask: torch.Tensor | None
    # [T] int32, each row's slot (-1: base model): the native kernel's input, set instead of
    # the two above where LoRALinear.native.
    row_slots: torch.Tensor | None = None


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
        self.max_loras = max_loras
        self.stacked_rank = len(slice_sizes) * max_rank
        out_features = sum(slice_sizes)
        self.lora_a = torch.zeros(
            max_loras * self.stacked_rank, in_features, dtype=dtype, device=device)
        self.lora_b_t = torch.zeros(
            max_loras * self.stacked_rank, out_features, dtype=dtype, device=device)
        # Rank of slice j in slot s (0: not targeted), so the kernel skips padding and zeros.
        self.ranks = torch.zeros(max_loras, len(slice_sizes), dtype=torch.int32)
        self.native = lora_native(dtype, device)

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
        rows = slice(slot * self.stacked_rank, (slot + 1) * self.stacked_rank)
        a, b_t = self.lora_a[rows], self.lora_b_t[rows]
        a.zero_()
        b_t.zero_()
        self.ranks[slot].zero_()
        for index, (a_j, b_j) in factors.items():
            self.ranks[slot, index] = a_j.shape[0]
            rank, first = a_j.shape[0], index * self.max_rank
            offset, size = self.slice_offsets[index], self.slice_sizes[index]
            a[first : first + rank].copy_(a_j)
            b_t[first : first + rank, offset : offset + size].copy_(b_j.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        step = self.context.step
        if step is None:
            return out
        if step.row_slots is not None:
            ops.lora_bf16(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), self.lora_a,
                          self.lora_b_t, self.ranks, step.row_slots, self.slice_sizes,
                          self.max_rank)
            return out
        if step.whole_batch_slot is not None:
            rows = slice(step.whole_batch_slot * self.stacked_rank,
                         (step.whole_batch_slot + 1) * self.stacked_rank)
            return out.addmm_(x @ self.lora_a[rows].t(), self.lora_b_t[rows])
        assert step.slot_mask is not None
        shrunk = x @ self.lora_a.t()  # [T, slots * n*R]
        shrunk.view(x.shape[0], self.max_loras, self.stacked_rank).mul_(step.slot_mask[:, :, None])
        return out.addmm_(shrunk, self.lora_b_t)


def lora_native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether adapters of a model in `dtype` on `device` take the native kernel."""
    return dtype == torch.bfloat16 and device.type == "cpu" and ops.linear_bf16_available()
