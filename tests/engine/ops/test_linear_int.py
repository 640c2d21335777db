"""The W8A16 / W4A16 kernel (csrc/cpu/linear_int.cpp) against a pure-torch dequantize-then-
matmul, and the quantized layer's torch path (the fallback for float32 and other CPUs).

The kernel multiplies bf16 x by the integers plus a fixed offset exactly, sums in fp32, removes
the offset's share and applies the scales per group, then rounds once to bf16: every output
lies within one bf16 rounding of the exact x . (Q * scale) plus the fp32 summation error of
terms as large as the offset makes them.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as F
from torch.utils import cpp_extension

from engine import linear_kernel, native_build, ops
from engine.layers.linear import Linear
from engine.layers.quant.panels import DEQUANTIZE_ROWS, dequantize_panels, pack_int_panels
from engine.layers.quantized_linear import (
    QuantizedLinear,
    WeightQuant,
    dequantize,
    finalize_quantized_linears,
)


def kernel_available() -> bool:
    if shutil.which(native_build.compiler()) is None or not cpp_extension.is_ninja_available():
        return False
    return ops.native_available("cpu") and ops.linear_bf16_available()


needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no AVX512_BF16 kernels here")


@pytest.fixture(autouse=True)
def exact_activations():
    """The bounds here are the exact W8A16 kernel's (bf16 activations); the int8-activation
    kernel has its own (test_linear_int_activations.py). Modules importing this apply it too."""
    previous = linear_kernel.set_int_activations("bf16") if kernel_available() else None
    yield
    if previous is not None:
        linear_kernel.set_int_activations(previous)


def random_int_weight(out_features: int, in_features: int, bits: int, group: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    limit = 2 ** (bits - 1)
    qweight = torch.randint(-limit, limit, (out_features, in_features), generator=generator,
                            dtype=torch.int8)
    groups = -(-in_features // group)
    scale = torch.rand(out_features, groups, generator=generator) * 0.02 + 1e-3
    return qweight, scale


def exact(x, qweight, scale, group, bias) -> torch.Tensor:
    expanded = scale.double().repeat_interleave(group, dim=1)[:, : qweight.shape[1]]
    weight = qweight.double() * expanded
    out = x.double() @ weight.T
    return out if bias is None else out + bias.double()


def summation_bound(x, scale, group, bits) -> torch.Tensor:
    """fp32 error of summing a group's terms x_k (u_k + offset) (each at most C |x_k|), before
    the scale: n * 2^-24 * C * sum |x_k| per group."""
    offset_share = 2304 if bits == 8 else 136
    expanded = scale.double().repeat_interleave(group, dim=1)[:, : x.shape[1]]
    return min(group, x.shape[1]) * 2.0**-24 * offset_share * (x.double().abs() @ expanded.T)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize(
    ("bits", "out_features", "in_features", "group"),
    [
        (8, 48, 256, 256),   # per channel
        (8, 37, 200, 200),   # rows not a multiple of the 16-row panel
        (8, 130, 96, 32),    # int8 in groups
        (4, 64, 256, 128),   # the int4 default
        (4, 33, 200, 128),   # K not a multiple of the group: a partial last group
        (4, 300, 160, 160),  # per channel
        (4, 24, 88, 8),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_dequantize_then_matmul(tokens, bits, out_features, in_features, group,
                                               with_bias) -> None:
    qweight, scale = random_int_weight(out_features, in_features, bits, group, seed=tokens)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(7)).bfloat16()
    bias = torch.randn(out_features).bfloat16() if with_bias else None
    packed, panel_scales = pack_int_panels(qweight, scale, bits, group)
    assert packed.numel() == -(-out_features // 16) * 16 * in_features * bits // 8
    out = ops.linear_int(x, packed, panel_scales, bias, out_features, bits, group)
    expected = exact(x, qweight, scale, group, bias)
    if ops._cpu_module().int_prefill_on_tiles(tokens):
        # Prefill on AMX multiplies the weights rounded to bf16 as torch rounds them
        # (csrc/cpu/linear_int_prefill.cpp): the exact product with those.
        weight = dequantize(qweight, scale, group).to(torch.bfloat16).double()
        expected = x.double() @ weight.T + (0.0 if bias is None else bias.double())
    tolerance = expected.abs() * 2.0**-8 + summation_bound(x, scale, group, bits)
    error = (out.double() - expected).abs()
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, out_features)
    assert bool((error <= tolerance + 1e-6).all()), f"max error {float(error.max())}"
    # Typical errors are the final rounding's, far inside the worst-case bound.
    assert float(error.norm() / expected.norm()) < 2.0**-8


@needs_kernel
@pytest.mark.parametrize(("bits", "out_features", "in_features", "group"),
                         [(8, 37, 200, 200), (8, 48, 96, 32), (4, 33, 200, 128), (4, 24, 88, 8)])
def test_prefill_copy_is_torchs_bfloat16_dequantization(bits, out_features, in_features,
                                                         group) -> None:
    """Prefill multiplies a bf16 copy with linear_bf16: exactly the panels of torch's
    `(Q.float() * scale).to(bfloat16)`."""
    qweight, scale = random_int_weight(out_features, in_features, bits, group, seed=5)
    packed, panel_scales = pack_int_panels(qweight, scale, bits, group)
    copy = dequantize_panels(packed, panel_scales, bits, group, out_features, in_features)
    expected = ops.pack_linear_weight(dequantize(qweight, scale, group).to(torch.bfloat16))
    assert torch.equal(copy, expected)


@needs_kernel
def test_kernel_reads_strided_rows() -> None:
    qweight, scale = random_int_weight(40, 128, 4, 128, seed=3)
    wide = torch.randn(6, 256).bfloat16()
    x = wide[:, :128]  # row stride 256
    packed, panel_scales = pack_int_panels(qweight, scale, 4, 128)
    out = ops.linear_int(x, packed, panel_scales, None, 40, 4, 128)
    contiguous = ops.linear_int(x.contiguous(), packed, panel_scales, None, 40, 4, 128)
    assert torch.equal(out, contiguous)


@pytest.mark.parametrize("quant", [WeightQuant(8, None, "int8"), WeightQuant(4, 128, "int4")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_is_dequantize_then_linear(quant, dtype) -> None:
    """The fallback every device has: exactly F.linear over the dequantized weight."""
    torch.manual_seed(0)
    linear = Linear(200, 36, bias=True, dtype=dtype, device="cpu")
    linear.weight.data.normal_(0, 0.1)
    linear.bias.data.normal_(0, 0.1)
    layer = QuantizedLinear.from_weight(linear, quant)
    weight = layer.dequantized_weight(dtype)
    layer.finalize(use_kernel=False)
    x = torch.randn(5, 200).to(dtype)
    assert torch.equal(layer(x), F.linear(x, weight, linear.bias))
    # Round-to-nearest keeps every weight within half a step of the original (plus the
    # dequantized weight's own rounding to bf16).
    step = dequantize(torch.ones(36, 200, dtype=torch.int8), layer.scale, layer.group_size)
    original = linear.weight.float()
    slack = step * 1e-3 + (original.abs() * 2.0**-8 if dtype == torch.bfloat16 else 0.0)
    assert bool(((weight.float() - original).abs() <= step / 2 + slack).all())


@needs_kernel
def test_shapes_the_kernel_cannot_take_keep_the_torch_path() -> None:
    linear = Linear(90, 20, bias=False, dtype=torch.bfloat16, device="cpu")  # 90 % 4 != 0
    linear.weight.data.normal_(0, 0.05)
    layer = QuantizedLinear.from_weight(linear, WeightQuant(4, 128, "int4"))
    finalize_quantized_linears(torch.nn.Sequential(layer), use_kernel=True)
    assert layer.packing == "dequantize"
    x = torch.randn(2, 90).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(torch.bfloat16)))


@needs_kernel
def test_layer_kernel_agrees_with_its_torch_path() -> None:
    torch.manual_seed(1)
    linear = Linear(256, 72, bias=False, dtype=torch.bfloat16, device="cpu")
    linear.weight.data.normal_(0, 0.05)
    kernel = QuantizedLinear.from_weight(linear, WeightQuant(4, 128, "int4"))
    torch_path = QuantizedLinear.from_weight(linear, WeightQuant(4, 128, "int4"))
    kernel.finalize(use_kernel=True)
    torch_path.finalize(use_kernel=False)
    assert kernel.packing == "int_panels" and kernel.weight_packed is None
    for rows in (3, DEQUANTIZE_ROWS + 5):  # linear_int's tiles, then the prefill copy
        x = torch.randn(rows, 256).bfloat16()
        torch.testing.assert_close(kernel(x).float(), torch_path(x).float(), atol=2e-2,
                                   rtol=2e-2)


@pytest.mark.parametrize("quant", [WeightQuant(8, None, "int8"), WeightQuant(4, 128, "int4")])
def test_resident_bytes_are_the_formats_nominal_size(quant) -> None:
    """After finalize a kernel layer holds its packed integers and fp32 scales only: within 5%
    of the format's nominal bytes (bits per weight plus a bf16 scale per group)."""
    linear = Linear(1024, 512, bias=False, dtype=torch.bfloat16, device="cpu")
    linear.weight.data.normal_(0, 0.05)
    layer = QuantizedLinear.from_weight(linear, quant)
    layer.finalize(use_kernel=True)
    held = [t for t in (layer.panels, layer.panel_scales, layer.qweight, layer.scale,
                        layer.weight_packed, layer.weight_scale) if t is not None]
    resident = sum(t.numel() * t.element_size() for t in held)
    nominal = 512 * 1024 * quant.bits / 8 + 512 * quant.groups(1024) * 2
    assert resident <= 1.05 * nominal, (resident, nominal)
