"""moe_bf16's experts on AMX tiles (csrc/cpu/moe_bf16.cpp through panel_gemm_amx.h) against
the same kernel pinned to AVX512_BF16 and a dense torch mixture of experts: in_features that
are multiples of 32 (both GEMMs take AMX), expert loads from 1 row to most of the batch, so
tiles run past an expert's last row. Skips where the CPU or OS has no AMX."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.nn import functional as F

from engine import linear_kernel
from engine.layers.moe import FusedExperts, MoERouting, route


@pytest.fixture(autouse=True)
def amx_host() -> Iterator[None]:
    if not linear_kernel.amx_available():
        pytest.skip("this CPU or OS does not allow AMX-BF16 (or no native kernel build)")
    previous = linear_kernel.set_linear_kernel("auto")
    yield
    linear_kernel.set_linear_kernel(previous)


def dense_moe(x: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              routing: MoERouting) -> torch.Tensor:
    """Every expert over every token in bf16 torch, kept where the router chose it."""
    top, ids = route(logits, routing)
    per_choice = torch.zeros(*ids.shape, x.shape[1], dtype=torch.promote_types(x.dtype, top.dtype))
    for expert in range(w13.shape[0]):
        gate, up = F.linear(x, w13[expert]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, w2[expert])
        chosen = (ids == expert).unsqueeze(-1)
        per_choice = torch.where(chosen, out.unsqueeze(1) * top.unsqueeze(-1), per_choice)
    return per_choice.sum(dim=1).to(x.dtype)


def build(w13: torch.Tensor, w2: torch.Tensor, routing: MoERouting) -> FusedExperts:
    num_experts, double_inter, hidden = w13.shape
    experts = FusedExperts(num_experts, hidden, double_inter // 2, routing, dtype=w13.dtype,
                           device="cpu")
    experts.load_expert(None, "gate_up_proj", w13)
    experts.load_expert(None, "down_proj", w2)
    assert experts.prepack()
    return experts


@pytest.mark.parametrize("num_tokens", [5, 37, 130])
@pytest.mark.parametrize(("hidden", "inter"), [(64, 96), (128, 40)])
def test_amx_experts_match_avx512_and_dense(num_tokens: int, hidden: int, inter: int) -> None:
    # (128, 40): the down projection's in_features (40) is not a multiple of 32, so only the
    # gate/up GEMM takes AMX.
    gen = torch.Generator().manual_seed(num_tokens + hidden)
    num_experts = 8
    routing = MoERouting(num_experts, 2, True)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).bfloat16()
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16()
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[: num_tokens * 3 // 4, 3] = 10.0  # one expert takes most rows, others a few
    logits = logits.bfloat16()
    experts = build(w13, w2, routing)
    amx = experts(x, logits)
    linear_kernel.set_linear_kernel("avx512")
    avx512 = experts(x, logits)
    expected = dense_moe(x, logits, w13, w2, routing)
    for actual in (amx, avx512):
        error = (actual.double() - expected.double()).abs()
        tolerance = expected.double().abs() * 2.0**-7 + 2.0**-12 * float(expected.abs().max())
        assert bool((error <= tolerance).all()), f"max error {float(error.max())}"
    # The two kernels differ only where an fp32 summation order flips a rounding.
    assert float((amx == avx512).float().mean()) > 0.98
