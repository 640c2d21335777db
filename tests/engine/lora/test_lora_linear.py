"""LoRALinear against a plain per-row torch reference: each row gets base(x) plus its own
adapter's update on the slices that adapter targets, whatever the mix of a step."""
from __future__ import annotations

import torch

from engine.layers.linear import Linear
from engine.layers.lora import LoRAContext, LoRALinear, LoRAStep

SLICES = (8, 4, 4)  # a qkv-shaped projection
IN = 12


def _reference(x, base, adapters, row_adapter):
    out = torch.nn.functional.linear(x, base.weight)
    offsets = [0, 8, 12]
    for row, name in enumerate(row_adapter):
        if name is None:
            continue
        for index, (a, b) in adapters[name].items():
            out[row, offsets[index] : offsets[index] + SLICES[index]] += (x[row] @ a.t()) @ b.t()
    return out


def test_mixed_rows_and_single_adapter_steps_match_the_reference() -> None:
    torch.manual_seed(0)
    base = Linear(IN, sum(SLICES), bias=False, dtype=torch.float32, device="cpu")
    base.weight.data.normal_()
    context = LoRAContext()
    lora = LoRALinear(base, SLICES, IN, max_loras=3, max_rank=4, context=context,
                      dtype=torch.float32, device=torch.device("cpu"))
    adapters = {
        "q_only": {0: (torch.randn(2, IN), torch.randn(8, 2))},
        "kv": {1: (torch.randn(4, IN), torch.randn(4, 4)), 2: (torch.randn(3, IN), torch.randn(4, 3))},
        "all": {j: (torch.randn(1, IN), torch.randn(size, 1)) for j, size in enumerate(SLICES)},
    }
    slots = {"q_only": 2, "kv": 0, "all": 1}
    for name, factors in adapters.items():
        lora.set_slot(slots[name], factors)
    x = torch.randn(7, IN)
    row_adapter = ["kv", None, "all", "q_only", "q_only", None, "kv"]
    mask = torch.zeros(7, 3)
    for row, name in enumerate(row_adapter):
        if name is not None:
            mask[row, slots[name]] = 1
    context.step = LoRAStep(whole_batch_slot=None, slot_mask=mask)
    torch.testing.assert_close(lora(x), _reference(x, base, adapters, row_adapter))
    context.step = LoRAStep(whole_batch_slot=slots["kv"], slot_mask=None)
    torch.testing.assert_close(lora(x), _reference(x, base, adapters, ["kv"] * 7))
    context.step = None
    torch.testing.assert_close(lora(x), _reference(x, base, adapters, [None] * 7))
    # A slot rewritten with another adapter forgets the slices the old one targeted.
    lora.set_slot(slots["all"], adapters["q_only"])
    context.step = LoRAStep(whole_batch_slot=slots["all"], slot_mask=None)
    torch.testing.assert_close(lora(x), _reference(x, base, adapters, ["q_only"] * 7))
