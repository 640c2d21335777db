"""The fused bf16 pointwise kernels (csrc/cpu/pointwise_bf16.cpp) against the torch
expressions they replace in the Llama layers.

Each kernel rounds to bf16 where torch does, so results are bit-identical except where fp32
summation order (the RMS reduction) or exp's last bit flips a rounding: at most one bf16 ulp,
on a small fraction of elements.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from engine import ops
from engine.layers.norm import RMSNorm
from engine.layers.rotary import apply_rotary, rotate_in_place


# The native CPU ops (tests/conftest.py) for every test here.
pytestmark = pytest.mark.usefixtures("native_cpu_ops")


def assert_nearly_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.bfloat16
    differ = actual != expected
    assert float(differ.float().mean()) < 0.01, "more than 1% of elements differ"
    # Where they differ, by one bf16 ulp at most (2^-7 relative, on the larger magnitude).
    a, e = actual[differ].float(), expected[differ].float()
    assert bool(((a - e).abs() <= torch.maximum(a.abs(), e.abs()) * 2.0**-7).all())


def make_norm(hidden: int, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5, dtype=torch.bfloat16, device="cpu")
    norm.weight.copy_(torch.randn(hidden, generator=gen) * 0.5 + 1)
    return norm


@pytest.mark.parametrize("num_tokens", [1, 3, 64, 300])
@pytest.mark.parametrize("hidden", [64, 768, 1000])
def test_rms_norm(num_tokens: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens + hidden)
    norm = make_norm(hidden, gen)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).bfloat16()
    assert ops.fused_pointwise_available(x)
    assert_nearly_identical(norm(x), norm.reference(x))


@pytest.mark.parametrize("num_tokens", [1, 5, 200])
def test_add_then_norm_updates_the_residual_in_place(num_tokens: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    norm = make_norm(256, gen)
    residual = torch.randn(num_tokens, 256, generator=gen).bfloat16()
    # A strided delta, as a column slice of a wider projection output would be.
    delta = torch.randn(num_tokens, 300, generator=gen).bfloat16()[:, 20:276]
    expected_sum = residual + delta
    expected = norm.reference(expected_sum)
    actual = norm.add_and_forward(residual, delta)
    assert torch.equal(residual, expected_sum)  # one bf16 add: exactly torch's rounding
    assert_nearly_identical(actual, expected)


@pytest.mark.parametrize("num_tokens", [1, 4, 100])
def test_silu_and_mul(num_tokens: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    gate_up = (torch.randn(num_tokens, 2 * 688, generator=gen) * 4).bfloat16()
    expected = F.silu(gate_up[:, :688]) * gate_up[:, 688:]
    assert_nearly_identical(ops.silu_and_mul_bf16(gate_up), expected)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_in_place_on_a_fused_projection_view(head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, heads, kv_heads = 9, 6, 2
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).bfloat16()
    value_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(num_tokens, heads + kv_heads, head_dim)
    angles = torch.randn(num_tokens, 1, head_dim // 2, generator=gen) * 3
    cos = torch.cat((angles.cos(), angles.cos()), -1).bfloat16()
    signed_sin = torch.cat((-angles.sin(), angles.sin()), -1).bfloat16()
    expected = apply_rotary(qk.clone(), cos, signed_sin)
    rotated = rotate_in_place(qk, cos, signed_sin)
    assert rotated.data_ptr() == qk.data_ptr()  # written into the projection itself
    # Every product and the sum round as torch rounds them: bit-identical.
    assert torch.equal(rotated, expected)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], value_before)


def test_float32_keeps_the_torch_expressions() -> None:
    assert not ops.fused_pointwise_available(torch.zeros(2, 4))
