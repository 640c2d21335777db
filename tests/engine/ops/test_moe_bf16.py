"""FusedExperts (engine/layers/moe.py) against a dense pure-torch mixture of experts written
here: every expert over every token, its output kept where the router chose it.

In float32 the grouped torch path must equal the dense one up to float32 summation order. In
bfloat16 the native kernel (csrc/cpu/moe_bf16.cpp) rounds where the dense torch expression's
bf16 tensors round (gate/up, silu, product, down, weighted output) and sums in fp32, so nearly
every output is bit-identical; the rest differ by a rounding that flipped inside a GEMM (fp32
summation order), within one bf16 ulp of the output.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as F
from torch.utils import cpp_extension

from engine import native_build, ops
from engine.layers.moe import FusedExperts, MoERouting, route
from engine.layers.linear import prepack_cpu_linears

# Experts the router never picks in these tests: their weights are never used.
UNUSED_EXPERTS = (0, 5)


def native_kernel_available() -> bool:
    if shutil.which(native_build.compiler()) is None or not cpp_extension.is_ninja_available():
        return False
    return ops.native_available("cpu") and ops.linear_bf16_available()


needs_kernel = pytest.mark.skipif(
    not native_kernel_available(), reason="no AVX512_BF16 kernel build on this machine"
)


def dense_moe(
    x: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    routing: MoERouting,
) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    top, ids = torch.topk(probs, routing.top_k, dim=-1)
    if routing.renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    if not routing.float32_weights:
        top = top.to(logits.dtype)
    per_choice = torch.zeros(*ids.shape, x.shape[1], dtype=torch.promote_types(x.dtype, top.dtype))
    for expert in range(w13.shape[0]):
        gate, up = F.linear(x, w13[expert]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, w2[expert])
        chosen = (ids == expert).unsqueeze(-1)
        per_choice = torch.where(chosen, out.unsqueeze(1) * top.unsqueeze(-1), per_choice)
    return per_choice.sum(dim=1).to(x.dtype)


def make_case(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, seed: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, list(UNUSED_EXPERTS)] = -30.0
    return x, logits.to(dtype), w13, w2


def build(w13: torch.Tensor, w2: torch.Tensor, routing: MoERouting) -> FusedExperts:
    num_experts, double_inter, hidden = w13.shape
    experts = FusedExperts(num_experts, hidden, double_inter // 2, routing, dtype=w13.dtype,
                           device="cpu")
    experts.load_expert(None, "gate_up_proj", w13)
    experts.load_expert(None, "down_proj", w2)
    assert experts.missing_experts() == []
    return experts


def assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = (actual.double() - expected.double()).abs()
    # One bf16 ulp of the expected value (2^-8 relative at worst), and a floor at the
    # output's scale for values that cancel to near zero.
    tolerance = expected.double().abs() * 2.0**-7 + 2.0**-12 * float(expected.abs().max())
    assert bool((error <= tolerance).all()), f"max error {float(error.max())}"
    assert float((actual == expected).float().mean()) > 0.99


CASES = [
    pytest.param(num_experts, top_k, id=f"E{num_experts}-k{top_k}")
    for num_experts, top_k in ((8, 2), (16, 4))
]


@pytest.mark.parametrize("num_tokens", [1, 3, 64])
@pytest.mark.parametrize(("num_experts", "top_k"), CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_float32_grouped_path_matches_dense(
    num_tokens: int, num_experts: int, top_k: int, renormalize: bool
) -> None:
    routing = MoERouting(num_experts, top_k, renormalize)
    x, logits, w13, w2 = make_case(num_tokens, num_experts, top_k, 48, 40, seed=num_tokens,
                                   dtype=torch.float32)
    _, ids = route(logits, routing)
    assert not bool(torch.isin(ids, torch.tensor(UNUSED_EXPERTS)).any())
    out = build(w13, w2, routing)(x, logits)
    torch.testing.assert_close(out, dense_moe(x, logits, w13, w2, routing), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
@pytest.mark.parametrize(("num_experts", "top_k"), CASES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("float32_weights", [False, True], ids=["bf16-weights", "fp32-weights"])
def test_bf16_kernel_matches_dense(
    num_tokens: int, num_experts: int, top_k: int, renormalize: bool, float32_weights: bool
) -> None:
    routing = MoERouting(num_experts, top_k, renormalize, float32_weights)
    # I = 40: gate and up each end in a partial panel; H = 72: so does the down projection.
    x, logits, w13, w2 = make_case(num_tokens, num_experts, top_k, 72, 40,
                                   seed=100 + num_tokens, dtype=torch.bfloat16)
    experts = build(w13, w2, routing)
    assert experts.prepack()
    assert experts.w13 is None and experts.packed_gate_up is not None
    out = experts(x, logits)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert_close_bf16(out, dense_moe(x, logits, w13, w2, routing))


@needs_kernel
def test_bf16_kernel_uneven_expert_loads_and_strided_rows() -> None:
    """One expert takes most tokens (many-row tiles with a remainder), others one to three
    rows; hidden rows are a column slice of a wider tensor."""
    routing = MoERouting(8, 2, True)
    _, logits, w13, w2 = make_case(37, 8, 2, 64, 48, seed=7, dtype=torch.bfloat16)
    logits[:30, 3] = 10.0
    wide = torch.randn(37, 100, generator=torch.Generator().manual_seed(8)).bfloat16()
    x = wide[:, 20:84]
    experts = build(w13, w2, routing)
    expected = dense_moe(x, logits, w13, w2, routing)
    assert experts.prepack()
    assert_close_bf16(experts(x, logits), expected)


@needs_kernel
def test_prepack_cpu_linears_packs_fused_experts() -> None:
    routing = MoERouting(8, 2, True)
    x, logits, w13, w2 = make_case(5, 8, 2, 32, 16, seed=3, dtype=torch.bfloat16)
    model = torch.nn.ModuleDict({"experts": build(w13, w2, routing)})
    expected = model["experts"](x, logits)  # the grouped torch path, before packing
    prepack_cpu_linears(model)
    assert model["experts"].packed_gate_up is not None
    assert_close_bf16(model["experts"](x, logits), expected)


@needs_kernel
def test_native_op_rejects_bad_inputs_with_a_message() -> None:
    module = ops._cpu_module()
    w13 = torch.randn(4, 32, 16).bfloat16()
    w2 = torch.randn(4, 16, 16).bfloat16()
    gate_up, down = ops.pack_moe_gate_up(w13), ops.pack_moe_down(w2)
    x = torch.randn(2, 16).bfloat16()
    out = torch.empty_like(x)
    weights = torch.full((2, 2), 0.5)
    with pytest.raises(RuntimeError, match="expert id 4 out of range"):
        module.moe_bf16(out, x, torch.tensor([[0, 4], [1, 2]]), weights, gate_up, down, 16, True)
    with pytest.raises(RuntimeError, match="expert_ids must be"):
        module.moe_bf16(out, x, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), weights,
                        gate_up, down, 16, True)
    with pytest.raises(RuntimeError, match="routing weights must be"):
        module.moe_bf16(out, x, torch.tensor([[0, 1], [1, 2]]), weights.bfloat16(), gate_up,
                        down, 16, True)
    with pytest.raises(RuntimeError, match="down must be packed"):
        module.moe_bf16(out, x, torch.tensor([[0, 1], [1, 2]]), weights, gate_up, down, 14, True)
    with pytest.raises(ValueError, match="even expert input sizes"):
        ops.pack_moe_down(torch.randn(2, 16, 15).bfloat16())


@pytest.mark.parametrize("packed", [False, True])
def test_empty_batch(packed: bool) -> None:
    if packed and not native_kernel_available():
        pytest.skip("no AVX512_BF16 kernel build on this machine")
    _, _, w13, w2 = make_case(1, 8, 2, 32, 16, seed=4, dtype=torch.bfloat16)
    experts = build(w13, w2, MoERouting(8, 2, True))
    if packed:
        assert experts.prepack()
    out = experts(torch.zeros(0, 32, dtype=torch.bfloat16), torch.zeros(0, 8, dtype=torch.bfloat16))
    assert out.shape == (0, 32)
