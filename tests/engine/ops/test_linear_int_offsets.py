"""Asymmetric weights on the W8A16 / W4A16 kernel: w = Q * scale + offset per (row, group)
(GPTQ / AWQ / compressed-tensors zero points, offset = -zero * scale) against a float64
dequantize-then-matmul, and the prefill copy against torch's dequantization; scales that are
exactly fp16 (GGUF, GPTQ, AWQ) held as fp16 give the same results."""
from __future__ import annotations

import pytest
import torch
from test_linear_int import (  # noqa: F401 (exact_activations: an autouse fixture)
    exact_activations,
    needs_kernel,
    random_int_weight,
    summation_bound,
)

from engine import ops
from engine.layers.quant.panels import (
    DEQUANTIZE_ROWS,
    dequantize_panels,
    pack_group_values,
    pack_int_panels,
)
from engine.layers.quantized_linear import QuantizedLinear, WeightQuant, dequantize, pack_int32


def random_offsets(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """-zero * scale for integer zero points anywhere in the unsigned range."""
    generator = torch.Generator().manual_seed(11)
    zero = torch.randint(0, 2**bits, scale.shape, generator=generator) - 2 ** (bits - 1)
    return -zero.float() * scale


def exact(x, qweight, scale, offset, group) -> torch.Tensor:
    columns = qweight.shape[1]
    weight = (qweight.double() * scale.double().repeat_interleave(group, 1)[:, :columns]
              + offset.double().repeat_interleave(group, 1)[:, :columns])
    return x.double() @ weight.T


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 9])
@pytest.mark.parametrize(("bits", "out_features", "in_features", "group"),
                         [(4, 40, 256, 128), (4, 33, 200, 32), (8, 37, 96, 32), (8, 20, 64, 64)])
def test_kernel_with_offsets_matches_dequantize_then_matmul(tokens, bits, out_features,
                                                            in_features, group) -> None:
    qweight, scale = random_int_weight(out_features, in_features, bits, group, seed=tokens)
    offset = random_offsets(qweight, scale, bits)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(2)).bfloat16()
    packed, panel_scales = pack_int_panels(qweight, scale, bits, group)
    out = ops.linear_int(x, packed, panel_scales, None, out_features, bits, group,
                         pack_group_values(offset))
    expected = exact(x, qweight, scale, offset, group)
    # Beyond the symmetric kernel's bound: the offsets' share, sum(x) of a group in fp32.
    offset_share = (min(group, in_features) * 2.0**-24
                    * (x.double().abs() @ offset.double().abs().repeat_interleave(group, 1)
                       [:, :in_features].T))
    tolerance = (expected.abs() * 2.0**-8 + summation_bound(x, scale, group, bits)
                 + offset_share)
    error = (out.double() - expected).abs()
    assert bool((error <= tolerance + 1e-6).all()), f"max error {float(error.max())}"
    assert float(error.norm() / expected.norm()) < 2.0**-8
    # The offsets matter: without them the result is far off.
    plain = ops.linear_int(x, packed, panel_scales, None, out_features, bits, group)
    assert float((plain.double() - expected).norm() / expected.norm()) > 0.05


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 7, DEQUANTIZE_ROWS + 1])
@pytest.mark.parametrize(("bits", "group", "with_offsets"),
                         [(4, 32, False), (8, 32, False), (4, 128, True)])
def test_fp16_scales_give_the_fp32_results(tokens, bits, group, with_offsets) -> None:
    """Scales (and offsets) that are exactly fp16 are packed as fp16: the kernel, its prefill
    copy and the layer give bit for bit what fp32 copies of the same values give."""
    qweight, scale = random_int_weight(48, 256, bits, group, seed=9)
    scale = scale.half().float()
    offset = (random_offsets(qweight, scale, bits).half().float() if with_offsets else None)
    packed, half_scales = pack_int_panels(qweight, scale, bits, group)
    assert half_scales.dtype == torch.float16
    full_scales = half_scales.float()
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    half_offsets = None if offset is None else pack_group_values(offset)
    full_offsets = None if half_offsets is None else half_offsets.float()
    assert half_offsets is None or half_offsets.dtype == torch.float16
    for fn in (lambda s, o: ops.linear_int(x, packed, s, None, 48, bits, group, o),
               lambda s, o: dequantize_panels(packed, s, bits, group, 48, 256, o)):
        assert torch.equal(fn(half_scales, half_offsets), fn(full_scales, full_offsets))


@needs_kernel
@pytest.mark.parametrize(("bits", "group"), [(4, 128), (8, 32)])
def test_prefill_copy_with_offsets_is_the_dequantized_weight(bits, group) -> None:
    qweight, scale = random_int_weight(48, 256, bits, group, seed=4)
    offset = random_offsets(qweight, scale, bits)
    packed, panel_scales = pack_int_panels(qweight, scale, bits, group)
    copy = dequantize_panels(packed, panel_scales, bits, group, 48, 256,
                             pack_group_values(offset))
    # One fp32 rounding of Q * scale + offset (fused), then bf16.
    expected = ops.pack_linear_weight(
        dequantize(qweight, scale, group, offset).to(torch.bfloat16))
    torch.testing.assert_close(copy.float(), expected.float(), atol=1e-6, rtol=2.0**-8)


@needs_kernel
def test_asymmetric_layer_kernel_agrees_with_its_torch_path() -> None:
    quant = WeightQuant(4, 128, "gptq", asymmetric=True)
    qweight, scale = random_int_weight(72, 256, 4, 128, seed=6)
    offset = random_offsets(qweight, scale, 4)
    layers = []
    for _ in range(2):
        layer = QuantizedLinear(256, 72, bias=False, quant=quant, dtype=torch.bfloat16,
                                device="cpu")
        assert layer.weight_packed is not None and layer.weight_scale is not None
        assert layer.weight_offset is not None
        layer.weight_packed.data.copy_(pack_int32(qweight, 4))
        layer.weight_scale.data.copy_(scale)
        layer.weight_offset.data.copy_(offset)
        layers.append(layer)
    kernel, torch_path = layers
    kernel.finalize(use_kernel=True)
    torch_path.finalize(use_kernel=False)
    assert kernel.packing == "int_panels" and kernel.panel_offsets is not None
    for rows in (2, DEQUANTIZE_ROWS + 3):  # linear_int's tiles, then the prefill copy
        x = torch.randn(rows, 256).bfloat16()
        torch.testing.assert_close(kernel(x).float(), torch_path(x).float(), atol=2e-2,
                                   rtol=2e-2)
