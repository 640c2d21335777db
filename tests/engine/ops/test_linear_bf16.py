"""The AVX512_BF16 linear kernel (csrc/cpu/linear_bf16.cpp) against a float64 reference.

The kernel multiplies bf16 pairs exactly and accumulates in fp32, then rounds once to bf16; so
every output must lie within one bf16 rounding (half an ulp, 2^-9 relative) of the exact
result, plus the fp32 accumulation error. The grid covers every token-tile remainder (1..8
and past 8), out_features that are not a multiple of the 16-row panel, panel groups that do
not fill a tile, bias on and off, and strided inputs.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as F
from torch.utils import cpp_extension

from engine import native_build, ops


@pytest.fixture(scope="module", autouse=True)
def kernel_available() -> None:
    if shutil.which(native_build.compiler()) is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or ninja: the native CPU ops cannot be built here")
    assert ops.native_available("cpu"), "the native CPU ops failed to build (see the log)"
    if not ops.linear_bf16_available():
        pytest.skip("this CPU has no AVX512_BF16")


def exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def assert_within_one_rounding(actual: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    # Accumulation error bound for k fp32 additions of bf16 products (|x||w| scale), on top of
    # the final rounding to bf16.
    tolerance = expected.abs() * 2.0**-8 + k * 2.0**-22 * expected.abs().amax().clamp(min=1)
    error = (actual.double() - expected).abs()
    assert bool((error <= tolerance).all()), f"max error {float(error.max())}"


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 5, 7, 8, 9, 16, 21, 64])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 16), (96, 33), (256, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(
    num_tokens: int, in_features: int, out_features: int, with_bias: bool
) -> None:
    gen = torch.Generator().manual_seed(num_tokens * 1000 + in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    bias = torch.randn(out_features, generator=gen).bfloat16() if with_bias else None
    x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
    packed = ops.pack_linear_weight(weight)
    assert packed.shape == ((out_features + 15) // 16, in_features // 2, 16, 2)
    out = ops.linear_bf16(x, packed, bias, out_features)
    assert out.shape == (num_tokens, out_features) and out.dtype == torch.bfloat16
    assert_within_one_rounding(out, exact(x, weight, bias), in_features)
    # And it agrees with torch's own bf16 linear on nearly every element (ties aside).
    same = (out == F.linear(x, weight, bias)).float().mean()
    assert float(same) > 0.99


def test_strided_and_batched_inputs() -> None:
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(40, 64, generator=gen).bfloat16()
    packed = ops.pack_linear_weight(weight)
    # A column slice of a wider tensor (rows are strided) and a 3-D input.
    wide = torch.randn(5, 100, generator=gen).bfloat16()
    x = wide[:, 10:74]
    assert_within_one_rounding(ops.linear_bf16(x, packed, None, 40), exact(x, weight, None), 64)
    batched = torch.randn(2, 3, 64, generator=gen).bfloat16()
    out = ops.linear_bf16(batched, packed, None, 40)
    assert out.shape == (2, 3, 40)
    assert_within_one_rounding(out, exact(batched, weight, None), 64)


def test_bad_shapes_are_rejected_with_a_message() -> None:
    module = ops._cpu_module()
    weight = torch.randn(32, 64).bfloat16()
    packed = ops.pack_linear_weight(weight)
    with pytest.raises(RuntimeError, match="input must be"):
        module.linear_bf16(torch.empty(1, 32, dtype=torch.bfloat16),
                           torch.randn(1, 62).bfloat16(), packed, None)
    with pytest.raises(RuntimeError, match="out_features"):
        module.linear_bf16(torch.empty(1, 50, dtype=torch.bfloat16),
                           torch.randn(1, 64).bfloat16(), packed, None)
    with pytest.raises(ValueError, match="even in_features"):
        ops.pack_linear_weight(torch.randn(4, 63).bfloat16())
