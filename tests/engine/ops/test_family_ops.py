"""The bf16 kernels of the non-Llama families' layer parts (engine/family_ops.py: Gemma's
(1 + w) RMSNorm, per-head q/k RMSNorm, GeGLU, MoE routing) against the torch expressions
they replace (the norm modules' reference code, F.gelu, engine.layers.moe.route).

Each rounds to bf16 where torch does, so results are bit-identical except where fp32
summation order or an exp's last bit flips a rounding: one bf16 ulp at most, rarely.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from engine import family_ops, ops
from engine.layers.activation import gelu_tanh_and_mul
from engine.layers.moe import MoERouting, route
from engine.layers.norm import GemmaRMSNorm, RMSNorm


# The native CPU ops (tests/conftest.py) for every test here.
pytestmark = pytest.mark.usefixtures("native_cpu_ops")


def assert_nearly_identical(
    actual: torch.Tensor, expected: torch.Tensor, tiny: float = 0.0
) -> None:
    """Where they differ, by one bf16 ulp at most (2^-7 relative, on the larger magnitude),
    or by less than `tiny` in absolute terms."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.bfloat16
    differ = actual != expected
    assert float(differ.float().mean()) < 0.01, "more than 1% of elements differ"
    a, e = actual[differ].float(), expected[differ].float()
    bound = torch.maximum(a.abs(), e.abs()) * 2.0**-7
    assert bool(((a - e).abs() <= torch.clamp(bound, min=tiny)).all())


def _gemma_norm(hidden: int, gen: torch.Generator) -> GemmaRMSNorm:
    norm = GemmaRMSNorm(hidden, 1e-6, dtype=torch.bfloat16, device="cpu")
    norm.weight.copy_(torch.randn(hidden, generator=gen) * 0.5)
    return norm


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("hidden", [32, 768, 1000])
def test_gemma_rms_norm(num_tokens: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens + hidden)
    norm = _gemma_norm(hidden, gen)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).bfloat16()
    assert_nearly_identical(norm(x), norm.reference(x))


def test_gemma_add_then_norm_updates_the_residual_in_place() -> None:
    gen = torch.Generator().manual_seed(1)
    norm = _gemma_norm(256, gen)
    residual = torch.randn(5, 256, generator=gen).bfloat16()
    delta = torch.randn(5, 300, generator=gen).bfloat16()[:, 10:266]
    expected_sum = residual + delta
    out = norm.add_and_forward(residual, delta)
    assert torch.equal(residual, expected_sum)
    assert_nearly_identical(out, norm.reference(expected_sum))


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_head_norm_in_place_over_fused_rows(gemma: bool, num_tokens: int) -> None:
    """q heads of a fused [q | k | v] row, normed per head in place; the other heads kept."""
    gen = torch.Generator().manual_seed(num_tokens + gemma)
    heads, kv_heads, dim = 4, 2, 24
    norm_class = GemmaRMSNorm if gemma else RMSNorm
    norm = norm_class(dim, 1e-6, dtype=torch.bfloat16, device="cpu")
    norm.weight.copy_(torch.randn(dim, generator=gen) * 0.5 + (0 if gemma else 1))
    qkv = (torch.randn(num_tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 2).bfloat16()
    qk = qkv[:, : (heads + kv_heads) * dim].view(num_tokens, heads + kv_heads, dim)
    expected_q = norm.reference(qk[:, :heads].clone())
    untouched = qkv[:, heads * dim :].clone()
    family_ops.head_norm_bf16_(qk[:, :heads], norm.weight, norm.eps, gemma)
    assert_nearly_identical(qk[:, :heads].contiguous(), expected_q)
    assert torch.equal(qkv[:, heads * dim :], untouched)


@pytest.mark.parametrize("num_tokens", [1, 4, 200])
@pytest.mark.parametrize("width", [16, 96, 1000])
def test_gelu_tanh_and_mul(num_tokens: int, width: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens * width)
    gate_up = (torch.randn(num_tokens, 2 * width, generator=gen) * 3).bfloat16()
    gate, up = gate_up[:, :width], gate_up[:, width:]
    expected = F.gelu(gate, approximate="tanh") * up
    # torch's 0.5 g (1 + tanh(u)) cancels to 0 below g ~ -5.3; ours at a slightly different
    # g (its tanh's last bit), so a few products of ~1e-7 x up differ from 0 there.
    assert_nearly_identical(gelu_tanh_and_mul(gate_up), expected, tiny=1e-5)


@pytest.mark.parametrize("renormalize,float32_weights", [(True, True), (True, False),
                                                          (False, False)])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 128, 8), (33, 8, 2), (5, 4, 4)])
def test_moe_route_matches_transformers_routing(
    renormalize: bool, float32_weights: bool, num_tokens: int, num_experts: int, top_k: int
) -> None:
    gen = torch.Generator().manual_seed(num_tokens + num_experts)
    # Distinct logits (a random permutation of a spread): no ties for top-k to order.
    spread = torch.linspace(-4, 4, num_experts)
    logits = torch.stack([spread[torch.randperm(num_experts, generator=gen)]
                          for _ in range(num_tokens)]).bfloat16()
    routing = MoERouting(num_experts, top_k, renormalize, float32_weights)
    want_weights, want_ids = route(logits, routing)
    weights, ids = family_ops.moe_route_bf16(logits, top_k, renormalize, float32_weights)
    assert torch.equal(ids, want_ids)
    if float32_weights:
        torch.testing.assert_close(weights, want_weights, rtol=2e-6, atol=0)
    else:
        assert_nearly_identical(weights.bfloat16(), want_weights)
        assert torch.equal(weights.bfloat16().float(), weights)  # bf16 values


def test_moe_route_rejects_a_bad_top_k() -> None:
    logits = torch.zeros(2, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="top_k"):
        family_ops.moe_route_bf16(logits, 5, True, False)


@pytest.mark.parametrize("num_experts,top_k", [(8, 3), (128, 8), (6, 3), (4, 2)])
def test_moe_route_breaks_ties_as_torch_topk(num_experts: int, top_k: int) -> None:
    """bf16 router logits tie often; the experts picked among tied ones (and their order)
    are torch.topk's, so a model routes its tokens to the experts transformers picks."""
    gen = torch.Generator().manual_seed(num_experts)
    # Few distinct values: most rows hold ties across the top-k boundary.
    logits = torch.randint(0, 3, (64, num_experts), generator=gen).bfloat16()
    routing = MoERouting(num_experts, top_k, True, False)
    _, want_ids = route(logits, routing)
    _, ids = family_ops.moe_route_bf16(logits, top_k, True, False)
    assert torch.equal(ids, want_ids)
