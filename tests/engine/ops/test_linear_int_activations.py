"""linear_int with int8 activations (csrc/cpu/linear_int_vnni.cpp) against float64 references.

The kernel quantizes each token's activations per block of 32 columns as llama.cpp's Q8_0
blocks do (d = max |x| / 127, a = round(x / d)), multiplies the int8 values by the weights'
integers exactly and applies d, the weights' scales and offsets in fp32. Two references:

1. the same quantized activations (computed here in float32 torch ops, as the kernel does)
   times the weights' integers and scales in float64, plus the offsets times the exact x:
   the kernel lies within one bf16 rounding plus fp32 summation error of it;
2. the exact x times the dequantized weight in float64: the difference is at most the
   activation quantization error, d_b / 2 per column, times sum |Q * scale| over the block.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_checkpoints import random_k_blocks
from test_linear_int import needs_kernel, random_int_weight
from test_linear_int_offsets import random_offsets

from engine import linear_kernel, ops
from engine.layers.quant.k_quants import KQuantLinear, unpack_k_quant
from engine.layers.quant.panels import dequantize_panels, pack_group_values, pack_int_panels

BLOCK = 32


@pytest.fixture
def int8_activations():
    previous = linear_kernel.set_int_activations("int8")
    yield
    linear_kernel.set_int_activations(previous)


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int values [M, K] and scales d [M, K / 32], in the kernel's float32 steps."""
    rows, columns = x.shape
    blocks = x.float().view(rows, columns // BLOCK, BLOCK)
    d = blocks.abs().amax(dim=-1) / 127.0
    inverse = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inverse.unsqueeze(-1))
    return q.view(rows, columns), d


def expand(values: torch.Tensor, group: int, columns: int) -> torch.Tensor:
    return values.double().repeat_interleave(group, dim=1)[:, :columns]


def check(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
          offset: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """`weight` [N, K] float64: Q * scale (without offsets); `offset` [N, K] float64."""
    q, d = quantize_blocks(x)
    xq = q.double() * d.double().repeat_interleave(BLOCK, dim=1)
    exact_x = x.double()
    reference = xq @ weight.T
    exact = exact_x @ weight.T
    if offset is not None:  # the offsets' share uses x itself (sums of x per group)
        reference = reference + exact_x @ offset.T
        exact = exact + exact_x @ offset.T
    if bias is not None:
        reference = reference + bias.double()
        exact = exact + bias.double()
    columns = x.shape[1]
    # fp32: block sums scaled and added per group, groups added: at most K / 32 + a few
    # roundings of partial sums no larger than sum |x_k w_k|.
    magnitude = xq.abs() @ weight.abs().T
    if offset is not None:
        magnitude = magnitude + exact_x.abs() @ offset.abs().T
    slack = (columns // BLOCK + 4) * 2.0**-24 * magnitude + 1e-6
    error = (out.double() - reference).abs()
    assert bool((error <= reference.abs() * 2.0**-8 + slack).all()), float(error.max())
    # Against x itself: each column's activation is off by at most half its block's step.
    step = d.double().repeat_interleave(BLOCK, dim=1)
    quantization = (step / 2) @ weight.abs().T
    error = (out.double() - exact).abs()
    assert bool((error <= exact.abs() * 2.0**-8 + quantization + slack).all())
    # And the bound is not vacuous: typical errors are far below the norm of the result.
    assert float(error.norm() / exact.norm()) < 2.0**-5


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 13, 15, 300])
@pytest.mark.parametrize(
    ("bits", "out_features", "in_features", "group"),
    [
        (8, 48, 256, 256),  # per channel
        (8, 37, 96, 32),    # GGUF Q8_0's groups, rows not a multiple of 16
        (4, 64, 256, 128),  # the int4 default
        (4, 33, 160, 128),  # a partial last group
        (4, 72, 64, 32),    # GGUF Q4_0's groups
    ],
)
def test_kernel_matches_quantized_activation_reference(int8_activations, tokens, bits,
                                                       out_features, in_features,
                                                       group) -> None:
    assert linear_kernel.int8_activations_apply(bits, in_features, group)
    if ops._cpu_module().int_prefill_on_tiles(tokens):
        pytest.skip("prefill-sized calls run on AMX tiles here (the last test of this module)")
    qweight, scale = random_int_weight(out_features, in_features, bits, group, seed=tokens)
    generator = torch.Generator().manual_seed(tokens + 100)
    x = torch.randn(tokens, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    packed, panel_scales = pack_int_panels(qweight, scale, bits, group)
    out = ops.linear_int(x, packed, panel_scales, bias, out_features, bits, group)
    check(out, x, qweight.double() * expand(scale, group, in_features), bias=bias)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 9])
@pytest.mark.parametrize(("bits", "out_features", "in_features", "group"),
                         [(4, 40, 256, 128), (4, 33, 192, 32), (8, 20, 64, 64)])
def test_offsets_with_int8_activations(int8_activations, tokens, bits, out_features,
                                       in_features, group) -> None:
    qweight, scale = random_int_weight(out_features, in_features, bits, group, seed=tokens)
    offset = random_offsets(qweight, scale, bits)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(2)).bfloat16()
    packed, panel_scales = pack_int_panels(qweight, scale, bits, group)
    out = ops.linear_int(x, packed, panel_scales, None, out_features, bits, group,
                         pack_group_values(offset))
    check(out, x, qweight.double() * expand(scale, group, in_features),
          offset=expand(offset, group, in_features))


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 6])
def test_q4_k_with_int8_activations(int8_activations, tokens) -> None:
    """Q4_K: unsigned q with two-level scales and mins, on the int8 path (groups of 32)."""
    data = random_k_blocks((40, 512), "Q4_K", np.random.default_rng(9))
    values = unpack_k_quant(torch.from_numpy(data), "Q4_K")
    layer = KQuantLinear([(0, values)], None)
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    out = layer(x)
    sub = values.scales.double().repeat_interleave(32, dim=1)
    d = values.d.double().repeat_interleave(256, dim=1)
    dmin = values.dmin.double().repeat_interleave(256, dim=1)
    weight = d * sub * (values.qweight.double() + 8)
    offset = -dmin * values.mins.double().repeat_interleave(32, dim=1)
    gguf_values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K)
    assert torch.equal((weight + offset).float(), torch.from_numpy(np.array(gguf_values)))
    check(out, x, weight, offset=offset)


@needs_kernel
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 7, 40])  # decode tiles; 40: prefill (AMX tiles here)
def test_thread_counts_give_identical_results(int8_activations, threads, num_threads,
                                              rows) -> None:
    qweight, scale = random_int_weight(200, 512, 4, 128, seed=4)
    packed, panel_scales = pack_int_panels(qweight, scale, 4, 128)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(3)).bfloat16()
    torch.set_num_threads(1)
    single = ops.linear_int(x, packed, panel_scales, None, 200, 4, 128)
    torch.set_num_threads(num_threads)
    assert torch.equal(ops.linear_int(x, packed, panel_scales, None, 200, 4, 128), single)


@needs_kernel
def test_bf16_activations_stay_exact_and_other_shapes_keep_them(int8_activations) -> None:
    """"bf16" selects the exact W8A16 kernel; Q6_K and shapes whose in_features or group size
    is not a multiple of 32 always run it."""
    assert not linear_kernel.int8_activations_apply(6, 256, 16)
    assert not linear_kernel.int8_activations_apply(4, 200, 200)
    assert not linear_kernel.int8_activations_apply(4, 256, 8)
    qweight, scale = random_int_weight(48, 256, 8, 256, seed=1)
    packed, panel_scales = pack_int_panels(qweight, scale, 8, 256)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(5)).bfloat16()
    quantized = ops.linear_int(x, packed, panel_scales, None, 48, 8, 256)
    assert linear_kernel.set_int_activations("bf16") == "int8"
    assert not linear_kernel.int8_activations_apply(8, 256, 256)
    exact = ops.linear_int(x, packed, panel_scales, None, 48, 8, 256)
    expected = x.double() @ (qweight.double() * scale.double()).T
    assert float((exact.double() - expected).abs().max()) <= float(
        (quantized.double() - expected).abs().max())
    assert torch.equal(exact, ops.linear_int(x, packed, panel_scales, None, 48, 8, 256))
    with pytest.raises(ValueError, match="int8, bf16"):
        linear_kernel.set_int_activations("fp8")


def test_environment_variable_sets_the_initial_choice() -> None:
    if not ops.linear_bf16_available():
        pytest.skip("no AVX512_BF16 kernels here")
    script = ("from engine import linear_kernel\n"
              "print(linear_kernel.set_int_activations('int8'))\n")
    root = Path(__file__).resolve().parents[3]
    for value, expected in [("bf16", "bf16"), ("", "int8"),
                            ("int4", "PROTOSERVE_INT_ACTIVATIONS must be")]:
        env = {**os.environ, linear_kernel.INT_ACTIVATIONS_ENV: value}
        result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert expected in result.stdout + result.stderr, result.stderr[-2000:]



@needs_kernel
@pytest.mark.parametrize("tokens", [16, 17, 64, 300])
@pytest.mark.parametrize(("bits", "out_features", "in_features", "group"),
                         [(8, 48, 256, 256), (4, 33, 200, 128), (8, 37, 96, 32)])
def test_prefill_on_tiles_equals_the_whole_bf16_copy(tokens, bits, out_features, in_features,
                                                     group) -> None:
    """From 16 rows on AMX, linear_int dequantizes two panels at a time into a per-thread
    scratch (csrc/cpu/linear_int_prefill.cpp): the same bf16 weights and tile order as
    linear_bf16 over a whole dequantized copy, so the same bits."""
    if not ops._cpu_module().int_prefill_on_tiles(tokens):
        pytest.skip("no AMX tiles here: prefill multiplies the whole bf16 copy")
    qweight, scale = random_int_weight(out_features, in_features, bits, group, seed=tokens)
    packed, panel_scales = pack_int_panels(qweight, scale, bits, group)
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    copy = dequantize_panels(packed, panel_scales, bits, group, out_features, in_features)
    expected = ops.linear_bf16(x, copy, bias, out_features)
    assert torch.equal(ops.linear_int(x, packed, panel_scales, bias, out_features, bits, group),
                       expected)
