"""A Q4_K_M GGUF file (Q4_K projections, attn_v and ffn_down in Q6_K, written by the `gguf`
package's writer) served in bfloat16: every decoder projection runs from the file's own
blocks (KQuantLinear), each layer's product matches transformers' GGUF dequantization of the
same tensors (q/k rows unpermuted), and the weights held are the blocks' bytes, not bf16.
End-to-end logits of this file are compared in test_gguf_models.py.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from gguf_checkpoints import transformers_gguf_model, write_gguf
from model_factory import build_tiny_model

from engine import linear_kernel, ops
from engine.config import ModelConfig
from engine.layers.quant.k_quants import KQuantLinear
from engine.models.loader import load_model

SHAPE = dict(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512,
             initializer_range=0.15)
# Resident bits per weight of our layout and the file's, per type.
OUR_BITS = {"Q4_K": 4.625, "Q6_K": 6.5625}

pytestmark = pytest.mark.skipif(not ops.linear_bf16_available(),
                                reason="no AVX512_BF16 kernels here")


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("k_quants")
    base = build_tiny_model(root / "base", **SHAPE)
    (root / "file").mkdir()
    return write_gguf(base, root / "file" / "tiny-q4_k_m.gguf", projections="Q4_K",
                      output="Q6_K", overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K"})


def test_projections_run_from_the_files_blocks(q4_k_m) -> None:
    """The exact (bf16-activation) kernel's bound; Q4_K with int8 activations is checked in
    tests/engine/ops/test_linear_int_activations.py."""
    previous = linear_kernel.set_int_activations("bf16")
    try:
        check_projections(q4_k_m)
    finally:
        linear_kernel.set_int_activations(previous)


def check_projections(q4_k_m: Path) -> None:
    loaded = load_model(ModelConfig(model=str(q4_k_m), dtype="bfloat16"))
    hf = transformers_gguf_model(q4_k_m)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for ours, theirs in zip(loaded.model.model.layers, hf.model.layers, strict=True):
        attn, mlp = ours.self_attn, ours.mlp
        assert [s.kind for s in attn.qkv_proj.segments] == ["Q4_K", "Q6_K"]
        assert [s.kind for s in mlp.down_proj.segments] == ["Q6_K"]
        pairs = (
            (attn.qkv_proj, torch.cat([theirs.self_attn.q_proj.weight,
                                       theirs.self_attn.k_proj.weight,
                                       theirs.self_attn.v_proj.weight])),
            (attn.o_proj, theirs.self_attn.o_proj.weight),
            (mlp.gate_up_proj, torch.cat([theirs.mlp.gate_proj.weight,
                                          theirs.mlp.up_proj.weight])),
            (mlp.down_proj, theirs.mlp.down_proj.weight),
        )
        for layer, weight in pairs:
            assert isinstance(layer, KQuantLinear)
            inputs = x if layer.in_features == 256 else torch.randn(
                5, layer.in_features, generator=torch.Generator().manual_seed(1)).to(
                    torch.bfloat16)
            expected = inputs.double() @ weight.detach().double().T
            magnitude = inputs.double().abs() @ weight.detach().double().abs().T
            bound = expected.abs() * 2.0**-8 + magnitude * 2.0**-20 + 1e-6
            assert bool(((layer(inputs).double() - expected).abs() <= bound).all())


def test_resident_bytes_are_the_blocks(q4_k_m) -> None:
    loaded = load_model(ModelConfig(model=str(q4_k_m), dtype="bfloat16"))
    reader = gguf.GGUFReader(q4_k_m)
    file_bytes, expected = 0, 0.0
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] != "blk" or parts[-1] != "weight" or "norm" in parts[2]:
            continue
        kind = tensor.tensor_type.name
        file_bytes += int(tensor.n_bytes)
        expected += int(tensor.n_elements) * OUR_BITS[kind] / 8
    layers = [m for m in loaded.model.model.layers.modules() if isinstance(m, KQuantLinear)]
    assert len(layers) == 4 * len(loaded.model.model.layers)
    # The Q6_K output matrix is the LM head, from its blocks too.
    head = loaded.model.lm_head
    assert isinstance(head, KQuantLinear) and head.segments[0].kind == "Q6_K"
    output = next(t for t in reader.tensors if t.name == "output.weight")
    columns, rows = (int(size) for size in output.shape)
    padded_rows = -(-rows // 16) * 16  # whole 16-row panels
    assert head.resident_bytes() == padded_rows * columns * OUR_BITS["Q6_K"] / 8
    held = sum(layer.resident_bytes() for layer in layers)
    assert held == expected
    # Q6_K as in the file; Q4_K's 6-bit scales and mins take a byte each: within 3%.
    assert file_bytes <= held <= 1.03 * file_bytes
