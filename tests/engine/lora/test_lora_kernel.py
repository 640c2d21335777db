"""The native multi-LoRA kernel (ops.lora_bf16) against LoRALinear's torch path: every row
gets its own adapter on the slices that adapter targets, base rows stay bit-identical, over
mixed slots, different ranks, odd row counts and widths that are no multiple of the vector
width. Both round the shrunk rows and the sum to bfloat16 once; only fp32 summation order
differs, so they agree within two bfloat16 units in the last place of each output."""
from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.layers.linear import Linear
from engine.layers.lora import LoRAContext, LoRALinear, LoRAStep

pytestmark = pytest.mark.skipif(
    not ops.linear_bf16_available(), reason="needs the native ops with AVX512_BF16")

MAX_RANK = 8
SLOTS = 4


def _projection(slices: tuple[int, ...], in_features: int, seed: int,
                max_rank: int = MAX_RANK) -> LoRALinear:
    torch.manual_seed(seed)
    base = Linear(in_features, sum(slices), bias=False, dtype=torch.bfloat16, device="cpu")
    base.weight.data.normal_(0, 0.5)
    lora = LoRALinear(base, slices, in_features, max_loras=SLOTS, max_rank=max_rank,
                      context=LoRAContext(), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert lora.native
    # Slot 0: every slice at the full rank; 1: rank 3 on the first slice only; 2: rank 5 on
    # the last slice; 3: an odd rank on all but the first. B is large enough that the
    # adapters move the outputs by about as much as the base projection does.
    plans = {0: {j: max_rank for j in range(len(slices))}, 1: {0: 3},
             2: {len(slices) - 1: 5}, 3: {j: 7 for j in range(1, len(slices))}}
    for slot, plan in plans.items():
        lora.set_slot(slot, {j: (torch.randn(rank, in_features) * 0.3,
                                 torch.randn(slices[j], rank) * 0.3) for j, rank in plan.items()})
    return lora


def _mask(row_slots: list[int]) -> torch.Tensor:
    mask = torch.zeros(len(row_slots), SLOTS, dtype=torch.bfloat16)
    for row, slot in enumerate(row_slots):
        if slot >= 0:
            mask[row, slot] = 1
    return mask


def _assert_within_two_ulps(got: torch.Tensor, want: torch.Tensor) -> None:
    # One bfloat16 unit in the last place of |want| (8 significant bits).
    ulp = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
    excess = (got.float() - want.float()).abs() - 2 * ulp
    assert float(excess.max()) <= 0, f"off by more than 2 ulps at {int(excess.argmax())}"


@pytest.mark.parametrize(
    ("slices", "in_features", "row_slots", "max_rank"),
    [
        ((72, 24, 24), 40, [0, -1, 1, 2, 3, 0, -1], 8),  # qkv-like, odd rows, base rows
        ((300, 300), 96, [3, 3, 3, 3, 3, 1, 2, 0, 0, 0, 0, 0, -1], 8),  # gate_up-like, blocks
        ((48,), 33, [2], 8),  # one row, odd in_features
        ((40,), 64, [-1, -1, -1], 8),  # base rows only: nothing to add
        ((520,), 70, [1, 0] * 9, 8),  # interleaved slots, columns over one work chunk
        # A prefill-like run of one slot (many row blocks) next to slots of a few rows, base
        # rows and a partial last 32-k block.
        ((72, 24, 24), 40, [1] * 37 + [-1, 0] * 10 + [2] * 3, 8),
        # Rank 24 (six shrink tiles); two slots of interleaved rows gathered into blocks.
        ((300, 300), 96, [0, 3, -1] * 20 + [3], 24),
    ],
)
def test_kernel_matches_the_torch_path(
    slices: tuple[int, ...], in_features: int, row_slots: list[int], max_rank: int
) -> None:
    lora = _projection(slices, in_features, seed=len(row_slots), max_rank=max_rank)
    x = torch.randn(len(row_slots), in_features).bfloat16()
    base_out = lora.base(x)
    lora.context.step = LoRAStep(whole_batch_slot=None, slot_mask=_mask(row_slots))
    lora.native = False
    want = lora(x)
    lora.native = True
    lora.context.step = LoRAStep(None, None, row_slots=torch.tensor(row_slots, dtype=torch.int32))
    got = lora(x)
    base_rows = [row for row, slot in enumerate(row_slots) if slot < 0]
    assert torch.equal(got[base_rows], base_out[base_rows])
    adapter_rows = [row for row, slot in enumerate(row_slots) if slot >= 0]
    if adapter_rows:
        # Not vacuous: the adapters change most outputs by more than the tolerance.
        assert (want[adapter_rows] != base_out[adapter_rows]).float().mean() > 0.5
    _assert_within_two_ulps(got, want)


def test_whole_batch_of_one_adapter_matches_its_own_factors() -> None:
    lora = _projection((64, 32, 32), 48, seed=1)
    x = torch.randn(5, 48).bfloat16()
    lora.context.step = LoRAStep(whole_batch_slot=3, slot_mask=None)
    lora.native = False
    want = lora(x)
    lora.native = True
    lora.context.step = LoRAStep(None, None, row_slots=torch.full((5,), 3, dtype=torch.int32))
    _assert_within_two_ulps(lora(x), want)


def test_a_slot_out_of_range_is_refused_by_name() -> None:
    lora = _projection((16,), 32, seed=2)
    x = torch.randn(2, 32).bfloat16()
    out = lora.base(x)
    with pytest.raises(RuntimeError, match=r"row_slots\[1\] = 4 outside \[-1, 4\)"):
        ops.lora_bf16(out, x, lora.lora_a, lora.lora_b_t, lora.ranks,
                      torch.tensor([0, 4], dtype=torch.int32), lora.slice_sizes, MAX_RANK)
