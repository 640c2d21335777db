"""Layer building blocks against their transformers counterparts, bit for bit in bfloat16."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from engine.layers.linear import Linear, prepack_cpu_linears
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq, read_rope_spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    reference = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        reference.weight.normal_()
    ours = RMSNorm(96, 1e-5, dtype=dtype, device="cpu")
    ours.weight.copy_(reference.weight.detach())
    hidden = torch.randn(7, 96, dtype=dtype) * 4
    torch.testing.assert_close(ours(hidden), reference(hidden), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_reference(dtype: torch.dtype) -> None:
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        head_dim=32,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    positions = torch.tensor([0, 5, 63, 17, 1])
    query = torch.randn(len(positions), 4, 32).to(dtype)
    key = torch.randn(len(positions), 2, 32).to(dtype)
    cos, sin = LlamaRotaryEmbedding(config)(query, positions[None])
    # The reference works on [batch, heads, tokens, head_dim].
    expected_q, expected_k = apply_rotary_pos_emb(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin
    )
    rotary = RotaryEmbedding(compute_inv_freq(read_rope_spec(config), 32), 64, "cpu")
    our_cos, our_signed_sin = rotary.lookup(positions, dtype)
    actual_q = apply_rotary(query, our_cos, our_signed_sin)
    actual_k = apply_rotary(key, our_cos, our_signed_sin)
    torch.testing.assert_close(actual_q, expected_q[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(actual_k, expected_k[0].transpose(0, 1), atol=0, rtol=0)


def _two_linears() -> tuple[torch.nn.Sequential, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Linear(48, 80, bias=True, dtype=torch.bfloat16, device="cpu"),
        Linear(80, 48, bias=False, dtype=torch.bfloat16, device="cpu"),
    )
    for parameter in model.parameters():
        parameter.normal_()
    return model, [(layer.weight.detach().clone(), layer.bias) for layer in model]


def test_onednn_prepacked_linear_is_bit_identical_to_f_linear() -> None:
    model, weights = _two_linears()
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    for layer in model:
        layer.prepack_for_cpu("onednn")
    assert all(layer.weight is None and layer.packed_weight is not None for layer in model)
    for num_rows in (1, 5, 64):
        hidden = torch.randn(num_rows, 48, dtype=torch.bfloat16)
        expected = F.linear(F.linear(hidden, *weights[0]), weights[1][0])
        torch.testing.assert_close(model(hidden), expected, atol=0, rtol=0)


def test_model_loading_prepacks_with_our_kernel_where_it_is_built() -> None:
    from engine import ops

    model, weights = _two_linears()
    packing = prepack_cpu_linears(model)
    if not ops.linear_bf16_available():
        pytest.skip("no AVX512_BF16 kernels on this machine")
    assert packing == "panels"
    assert all(layer.weight is None and layer.packing == "panels" for layer in model)
    hidden = torch.randn(7, 48, dtype=torch.bfloat16)
    first = F.linear(hidden.double(), weights[0][0].double(), weights[0][1].double())
    # One bf16 rounding of the first layer's output separates the two paths; compare the
    # first layer alone tightly (the kernel's own tests cover the numerics in depth).
    torch.testing.assert_close(model[0](hidden).double(), first, rtol=2**-8, atol=1e-6)
