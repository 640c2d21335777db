"""GGUF K-quants (Q4_K, Q6_K) on the int kernels against gguf.quants' own dequantization.

Blocks are random bytes (every byte string is a valid block; tests/gguf_checkpoints.py sets
the fp16 super-scales to a trained model's range). Unpacking and the kernels' dequantized
weights must be gguf's float32 values exactly (bf16-rounded where the kernel writes bf16);
the streaming kernel's outputs lie within one bf16 rounding plus float32 summation error of
x . W in float64.
"""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf_checkpoints import random_k_blocks
from test_linear_int import exact_activations  # noqa: F401 (an autouse fixture)
from torch.utils import cpp_extension

from engine import native_build, ops
from engine.layers.quant.k_quants import KQuantLinear, unpack_k_quant
from engine.layers.quant.panels import DEQUANTIZE_ROWS


def kernel_available() -> bool:
    if shutil.which(native_build.compiler()) is None or not cpp_extension.is_ninja_available():
        return False
    return ops.native_available("cpu") and ops.linear_bf16_available()


needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no AVX512_BF16 kernels here")


def blocks(rows: int, columns: int, kind: str, seed: int) -> np.ndarray:
    return random_k_blocks((rows, columns), kind, np.random.default_rng(seed))


def gguf_weight(data: np.ndarray, kind: str) -> torch.Tensor:
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.array(values, dtype=np.float32))


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_unpacked_blocks_dequantize_to_ggufs_exact_values(kind) -> None:
    data = blocks(24, 512, kind, seed=1)
    values = unpack_k_quant(torch.from_numpy(data), kind)
    assert torch.equal(values.dequantize(), gguf_weight(data, kind))
    lo, hi = (-8, 7) if kind == "Q4_K" else (-32, 31)
    assert int(values.qweight.min()) >= lo and int(values.qweight.max()) <= hi


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_kernel_dequantizes_bit_exactly(kind) -> None:
    data = blocks(40, 512, kind, seed=2)
    layer = KQuantLinear([(0, unpack_k_quant(torch.from_numpy(data), kind))], None)
    segment = layer.segments[0]
    module = ops._cpu_module()
    weight = torch.empty(segment.panels.shape[0], 256, 16, 2, dtype=torch.bfloat16)
    module.linear_int_k_quant(torch.empty(0, 40, dtype=torch.bfloat16),
                              torch.empty(0, 512, dtype=torch.bfloat16), segment.panels,
                              segment.bits, segment.group_size, segment.scales, segment.mins,
                              segment.d, segment.dmin, segment.groups_per_block, None, weight)
    expected = ops.pack_linear_weight(gguf_weight(data, kind).to(torch.bfloat16))
    assert torch.equal(weight, expected)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 7, 40])
def test_mixed_k_quant_projection_matches_ggufs_weights(tokens) -> None:
    """A fused projection of Q4_K rows, then Q6_K rows (Q4_K_M's k | v), with a bias; from
    DEQUANTIZE_ROWS tokens on through bf16 panels (rounded as torch would) and linear_bf16."""
    q4, q6 = blocks(48, 256, "Q4_K", seed=3), blocks(20, 256, "Q6_K", seed=4)
    weight = torch.cat((gguf_weight(q4, "Q4_K"), gguf_weight(q6, "Q6_K")))
    bias = torch.randn(68, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    layer = KQuantLinear([(0, unpack_k_quant(torch.from_numpy(q4), "Q4_K")),
                          (48, unpack_k_quant(torch.from_numpy(q6), "Q6_K"))], bias)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(tokens))
    x = x.to(torch.bfloat16)
    out = layer(x)
    if tokens >= DEQUANTIZE_ROWS:  # prefill: the weights rounded to bf16, then linear_bf16
        weight = weight.to(torch.bfloat16)
    expected = x.double() @ weight.double().T + bias.double()
    # One bf16 rounding of the output plus float32 sums of 256 terms (per-group partial sums
    # up to |x| |w| each).
    scale = x.double().abs() @ weight.double().abs().T
    bound = expected.abs() * 2.0**-8 + scale * 2.0**-20 + 1e-6
    assert bool(((out.double() - expected).abs() <= bound).all())


@needs_kernel
def test_resident_bytes_follow_the_blocks() -> None:
    q4, q6 = blocks(32, 512, "Q4_K", seed=6), blocks(32, 512, "Q6_K", seed=7)
    for data, kind, bits_per_weight in ((q4, "Q4_K", 4.625), (q6, "Q6_K", 6.5625)):
        layer = KQuantLinear([(0, unpack_k_quant(torch.from_numpy(data), kind))], None)
        assert layer.resident_bytes() == 32 * 512 * bits_per_weight / 8
        file_bytes = data.nbytes
        # Q4_K: a byte per 32-group for its 6-bit scale and min; Q6_K: the file's size.
        assert layer.resident_bytes() <= file_bytes * (1.03 if kind == "Q4_K" else 1.0)
