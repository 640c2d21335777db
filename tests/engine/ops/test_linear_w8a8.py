"""The W8A8 kernel (csrc/cpu/linear_w8a8.cpp) against a float64 torch computation of
compressed-tensors' W8A8 arithmetic, and its kernels (AMX-INT8, AVX512-VNNI, the scalar C++
that CPUs without VNNI run) against each other.

Per token the activations are quantized exactly as the reference does it (float32 absmax /
127.5, division, half-to-even rounding), the int8 products are summed exactly in int32, and
the float epilogue is the same in every kernel: so the kernels agree bit for bit, and each
output lies within one bf16 rounding (plus float32's) of the exact result.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils import cpp_extension

from engine import linear_kernel, native_build, quantized_ops
from engine.layers.quant.w8a8 import fake_quantize_per_token, pack_w8a8_panels


def native_ready() -> bool:
    if shutil.which(native_build.compiler()) is None or not cpp_extension.is_ninja_available():
        return False
    return quantized_ops.linear_w8a8_available()


pytestmark = pytest.mark.skipif(not native_ready(), reason="no native CPU ops here")


@pytest.fixture
def restore_kernel():
    previous = linear_kernel.set_w8a8_kernel("auto")
    yield
    linear_kernel.set_w8a8_kernel(previous)


def case(tokens: int, in_features: int, out_features: int, seed: int, bias: bool):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, in_features, generator=generator) * 2).to(torch.bfloat16)
    x[0, 3] = 40.0  # one outlier: the token's scale follows its absmax
    qweight = torch.randint(-128, 128, (out_features, in_features), generator=generator,
                            dtype=torch.int8)
    scale = torch.rand(out_features, 1, generator=generator) * 0.01 + 1e-3
    b = (torch.randn(out_features, generator=generator)).to(torch.bfloat16) if bias else None
    return x, qweight, scale, b


def reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """float64 of the exact result: per-token int8 activations (float32, as the kernel and
    compressed-tensors compute them) times the int8 weights, scaled."""
    xf = x.float()
    token_scale = xf.abs().amax(dim=-1, keepdim=True) / 127.5
    token_scale = torch.where(token_scale == 0, torch.finfo(torch.float32).eps, token_scale)
    a = torch.round(xf / token_scale).clamp(-128, 127)
    out = (a.double() @ qweight.double().T) * token_scale.double() * scale.double().T
    return out if bias is None else out + bias.double()


def run(x, qweight, scale, bias):
    packed, scales = pack_w8a8_panels(qweight, scale)
    return quantized_ops.linear_w8a8(x, packed, scales, bias, qweight.shape[0])


@pytest.mark.parametrize("tokens", [1, 3, 5, 37])
@pytest.mark.parametrize(("in_features", "out_features"), [(192, 48), (200, 40), (68, 17)])
def test_every_kernel_matches_the_exact_w8a8_result(restore_kernel, tokens, in_features,
                                                    out_features) -> None:
    x, qweight, scale, bias = case(tokens, in_features, out_features, seed=tokens, bias=True)
    expected = reference(x, qweight, scale, bias)
    outputs = {}
    for kernel in linear_kernel.w8a8_kernels():
        linear_kernel.set_w8a8_kernel(kernel)
        outputs[kernel] = run(x, qweight, scale, bias)
        error = (outputs[kernel].double() - expected).abs()
        # One bf16 rounding (2^-8 relative) plus float32's in the epilogue.
        bound = expected.abs() * 2.0**-8 * 1.01 + 1e-6
        assert bool((error <= bound).all()), (kernel, float((error - bound).max()))
    first = next(iter(outputs.values()))
    for kernel, out in outputs.items():
        assert torch.equal(out, first), kernel
    assert "scalar" in outputs


def test_zero_rows_and_no_bias(restore_kernel) -> None:
    x, qweight, scale, _ = case(6, 128, 32, seed=9, bias=False)
    x[2] = 0  # an all-zero token: scale eps, every product 0
    expected = reference(x, qweight, scale, None)
    for kernel in linear_kernel.w8a8_kernels():
        linear_kernel.set_w8a8_kernel(kernel)
        out = run(x, qweight, scale, None)
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-6)


def test_torch_fake_quantization_is_compressed_tensors_own() -> None:
    """The torch path's activation step against the library's dynamic per-token quantizer."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True,
                            dynamic=True)
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(3)) * 3
    x[0, 1] = 0
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, torch.nn.Linear(96, 1))
    expected = fake_quantize(x, scale, zero_point, args)
    assert torch.equal(fake_quantize_per_token(x), expected)


def test_unknown_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="w8a8 kernel must be one of"):
        linear_kernel.set_w8a8_kernel("avx2")
