"""The linear kernels (csrc/cpu/linear_bf16.cpp: AVX512_BF16 and AMX tiles) against a float64
reference, each kernel pinned in turn; the AMX cases skip where the CPU or OS has no AMX.

The kernel multiplies bf16 pairs exactly and accumulates in fp32, then rounds once to bf16; so
every output must lie within one bf16 rounding (half an ulp, 2^-9 relative) of the exact
result, plus the fp32 accumulation error. The grid covers every token-tile remainder (1..8
and past 8), out_features that are not a multiple of the 16-row panel, panel groups that do
not fill a tile, bias on and off, and strided inputs; for AMX also 16-row tile remainders, k
not a multiple of the 32-k tile, odd panel counts and the benchmark model's shapes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torch.utils import cpp_extension

from engine import linear_kernel, native_build, ops


@pytest.fixture(scope="module", autouse=True)
def kernel_available() -> None:
    if shutil.which(native_build.compiler()) is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or ninja: the native CPU ops cannot be built here")
    assert ops.native_available("cpu"), "the native CPU ops failed to build (see the log)"
    if not ops.linear_bf16_available():
        pytest.skip("this CPU has no AVX512_BF16")


@pytest.fixture(params=["avx512", "amx"])
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Pins linear_bf16 to one kernel for the test, whatever the row count."""
    if request.param == "amx" and not linear_kernel.amx_available():
        pytest.skip("this CPU or OS does not allow AMX-BF16")
    previous = linear_kernel.set_linear_kernel(request.param)
    yield request.param
    linear_kernel.set_linear_kernel(previous)


def exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def assert_within_one_rounding(actual: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    # Accumulation error bound for k fp32 additions of bf16 products (|x||w| scale), on top of
    # the final rounding to bf16.
    tolerance = expected.abs() * 2.0**-8 + k * 2.0**-22 * expected.abs().amax().clamp(min=1)
    error = (actual.double() - expected).abs()
    assert bool((error <= tolerance).all()), f"max error {float(error.max())}"


def assert_agrees_with_torch(actual: torch.Tensor, torch_out: torch.Tensor,
                             expected: torch.Tensor, k: int) -> None:
    """Equal to torch's own bf16 linear on nearly every element; the rest are results that two
    fp32 summation orders round differently (near-ties, cancellations), so torch's output
    there is within the same bound of the exact result as ours."""
    same = float((actual == torch_out).float().mean())
    assert same > 0.99 or int((actual != torch_out).sum()) <= 1, f"{same:.4f} equal to torch"
    assert_within_one_rounding(torch_out, expected, k)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 5, 7, 8, 9, 16, 21, 64])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 16), (96, 33), (256, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(
    kernel: str, num_tokens: int, in_features: int, out_features: int, with_bias: bool
) -> None:
    gen = torch.Generator().manual_seed(num_tokens * 1000 + in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    bias = torch.randn(out_features, generator=gen).bfloat16() if with_bias else None
    x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
    packed = ops.pack_linear_weight(weight)
    assert packed.shape == ((out_features + 15) // 16, in_features // 2, 16, 2)
    out = ops.linear_bf16(x, packed, bias, out_features)
    assert out.shape == (num_tokens, out_features) and out.dtype == torch.bfloat16
    expected = exact(x, weight, bias)
    assert_within_one_rounding(out, expected, in_features)
    assert_agrees_with_torch(out, F.linear(x, weight, bias), expected, in_features)


@pytest.mark.parametrize("num_rows", [5, 32])
def test_strided_and_batched_inputs(kernel: str, num_rows: int) -> None:
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(40, 64, generator=gen).bfloat16()
    packed = ops.pack_linear_weight(weight)
    # A column slice of a wider tensor (rows are strided; 32 rows of k = 64 are whole AMX
    # tiles, read in place with that stride) and a 3-D input.
    wide = torch.randn(num_rows, 100, generator=gen).bfloat16()
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


@dataclass(frozen=True)
class ModelWeight:
    weight: torch.Tensor
    bias: torch.Tensor
    packed: torch.Tensor
    weight_f64: torch.Tensor  # the float64 reference's operand, converted once


@pytest.fixture(scope="module")
def model_weights() -> Iterator[Callable[[int, int], ModelWeight]]:
    """One weight per shape for the module: every row count and both kernels multiply the
    same matrix (a 32000 x 768 LM head took most of each case's time to draw, pack and
    convert to float64, once per case before); the inputs stay drawn per case."""
    made: dict[tuple[int, int], ModelWeight] = {}

    def get(in_features: int, out_features: int) -> ModelWeight:
        if (in_features, out_features) not in made:
            gen = torch.Generator().manual_seed(in_features + out_features)
            weight = (torch.randn(out_features, in_features, generator=gen)
                      / in_features**0.5).bfloat16()
            bias = torch.randn(out_features, generator=gen).bfloat16()
            made[(in_features, out_features)] = ModelWeight(
                weight, bias, ops.pack_linear_weight(weight), weight.double())
        return made[(in_features, out_features)]

    yield get
    made.clear()  # the float64 LM head alone is 196 MB


@pytest.mark.parametrize("num_tokens", [1, 7, 16, 33, 64, 257])
@pytest.mark.parametrize(
    ("in_features", "out_features"),
    # The benchmark model's qkv, down and LM head; then k tails (100 = 3 x 32 + 4, 2046) with
    # an odd panel count and a partial last panel.
    [(768, 2304), (2048, 768), (768, 32000), (100, 47), (2046, 81)],
)
def test_model_shapes_and_tails(
    kernel: str, num_tokens: int, in_features: int, out_features: int,
    model_weights: Callable[[int, int], ModelWeight],
) -> None:
    if out_features == 32000 and num_tokens > 64:
        pytest.skip("the float64 reference of a 257-row LM head is slow; 64 rows cover it")
    shape = model_weights(in_features, out_features)
    gen = torch.Generator().manual_seed(num_tokens + in_features + out_features)
    x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
    out = ops.linear_bf16(x, shape.packed, shape.bias, out_features)
    expected = x.double() @ shape.weight_f64.T + shape.bias.double()
    assert_within_one_rounding(out, expected, in_features)
    assert_agrees_with_torch(out, F.linear(x, shape.weight, shape.bias), expected, in_features)


def test_auto_takes_amx_from_4_rows() -> None:
    if not linear_kernel.amx_available():
        pytest.skip("this CPU or OS does not allow AMX-BF16")
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 2048, generator=gen).bfloat16()
    packed = ops.pack_linear_weight(weight)
    previous = linear_kernel.set_linear_kernel("auto")
    try:
        for num_tokens, expected_kernel in [(3, "avx512"), (4, "amx"), (40, "amx")]:
            x = torch.randn(num_tokens, 2048, generator=gen).bfloat16()
            auto = ops.linear_bf16(x, packed, None, 96)
            linear_kernel.set_linear_kernel(expected_kernel)
            pinned = ops.linear_bf16(x, packed, None, 96)
            linear_kernel.set_linear_kernel("auto")
            # Each kernel is deterministic: auto's output is bit for bit its choice's.
            assert torch.equal(auto, pinned), (num_tokens, expected_kernel)
    finally:
        linear_kernel.set_linear_kernel(previous)


def test_kernel_choice_is_checked() -> None:
    with pytest.raises(ValueError, match="linear kernel must be one of auto, avx512, amx"):
        linear_kernel.set_linear_kernel("sse")
    if not linear_kernel.amx_available():
        with pytest.raises(ValueError, match="does not allow AMX"):
            linear_kernel.set_linear_kernel("amx")
    # The environment variable: a valid one is the process's initial choice, a bad one is
    # named in the error of the first linear call.
    script = (
        "import torch\n"
        "from engine import linear_kernel, ops\n"
        "w = ops.pack_linear_weight(torch.ones(16, 32).bfloat16())\n"
        "ops.linear_bf16(torch.ones(1, 32).bfloat16(), w, None, 16)\n"
        "print(linear_kernel.set_linear_kernel('auto'))\n"
    )
    root = Path(__file__).resolve().parents[3]
    for value, expected in [("avx512", "avx512"), ("bogus", "PROTOSERVE_LINEAR_KERNEL must be")]:
        env = {**os.environ, linear_kernel.LINEAR_KERNEL_ENV: value}
        result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert expected in result.stdout + result.stderr, result.stderr[-2000:]
