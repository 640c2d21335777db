"""GGUF files (written by the `gguf` package, tests/gguf_checkpoints.py) served as the model
against transformers' own GGUF loading of the same file (gguf.quants dequantization, q/k rows
unpermuted), which is a pure-torch dequantize-then-matmul reference.

float32: logits to 1e-4, greedy equal. bfloat16 (Q8_0 / Q4_0 natively on the int kernels in
groups of 32, Q4_K_M from its own blocks: test_gguf_k_quants.py): within twice the error of
transformers' own bf16 model of the file.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf_checkpoints import transformers_gguf_model, write_gguf
from model_factory import build_tiny_model
from quant_checkpoints import greedy_against_reference, reference_logits
from transformers import AutoTokenizer

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.layers.linear import Linear
from engine.layers.quant.k_quants import KQuantLinear
from engine.layers.quantized_linear import QuantizedLinear
from engine.models.gguf_checkpoint import gguf_model_directory
from engine.models.loader import load_model
from engine.tokenizer.tokenizer import Tokenizer

# in_features 256 and 512: whole K-quant super-blocks of 256.
SHAPE = dict(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512,
             initializer_range=0.15)
# case -> (architecture, write_gguf options, bits on the int kernels or None: dequantized)
CASES = {
    "llama-Q8_0": ("llama", dict(projections="Q8_0", embeddings="Q8_0", output="Q8_0"), 8),
    "llama-Q4_0": ("llama", dict(projections="Q4_0", output="Q6_K"), 4),
    "llama-Q4_K_M": ("llama", dict(projections="Q4_K", output="Q6_K",
                                   overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K"}), None),
    "qwen2-Q4_0": ("qwen2", dict(projections="Q4_0"), 4),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {arch: build_tiny_model(root / arch, arch=arch, **SHAPE) for arch in ("llama", "qwen2")}


def write_case(bases: dict[str, Path], tmp_path: Path, case: str) -> Path:
    arch, options, _ = CASES[case]
    (tmp_path / case).mkdir()
    return write_gguf(bases[arch], tmp_path / case / f"{case}.gguf", **options)


def prompt() -> list[int]:
    return torch.randint(3, 400, (9,), generator=torch.Generator().manual_seed(4)).tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_file_matches_transformers_dequantization(bases, tmp_path, case) -> None:
    gguf_path = write_case(bases, tmp_path, case)
    bits = CASES[case][2]
    hf = transformers_gguf_model(gguf_path)
    loaded = load_model(ModelConfig(model=str(gguf_path), dtype="float32"))
    quantized = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    if bits is None:
        assert not quantized and isinstance(loaded.model.model.layers[0].mlp.down_proj, Linear)
    else:
        assert len(quantized) == 8
        assert all(m.quant.bits == bits and m.group_size == 32 for m in quantized)
    ours, theirs = greedy_against_reference(loaded, hf, prompt(), steps=5)
    for actual, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        assert int(actual[-1].argmax()) == int(expected[-1].argmax())
    kernels = load_model(ModelConfig(model=str(gguf_path), dtype="bfloat16"))
    # The LM head runs from the file's own blocks where they are Q8_0 / Q4_0 / Q6_K.
    output = CASES[case][1].get("output", "F32")
    head = kernels.model.lm_head
    if output in ("Q8_0", "Q4_0"):
        assert isinstance(head, QuantizedLinear) and head.packing == "int_panels"
    elif output == "Q6_K":
        assert isinstance(head, KQuantLinear) and head.segments[0].kind == "Q6_K"
    else:
        assert isinstance(head, Linear)
    if bits is not None:
        layers = [m for m in kernels.model.modules() if isinstance(m, QuantizedLinear)]
        assert all(m.packing == "int_panels" for m in layers)
        # Resident: the file's own bytes per block (bits / 8 per weight, an fp16 per 32); the
        # projections' rows fill whole 16-row panels (the LM head's vocabulary need not).
        for layer in layers:
            if layer is head:
                continue
            assert layer.panels is not None and layer.panel_scales is not None
            held = (layer.panels.numel() * layer.panels.element_size()
                    + layer.panel_scales.numel() * layer.panel_scales.element_size())
            weights = layer.out_features * layer.in_features
            assert held == weights * bits // 8 + weights // 32 * 2
    # bf16: within twice the float32 reference's distance to transformers' bf16 model of the
    # file (both are bf16 rounding noise of different implementations; float32 is the exact
    # comparison above).
    bf16_ours, _ = greedy_against_reference(kernels, hf, prompt(), steps=2)
    ids = prompt() + [int(step[-1].argmax()) for step in bf16_ours[:-1]]
    expected = reference_logits(hf, ids)
    theirs_bf16 = reference_logits(hf.to(torch.bfloat16), ids)
    our_error = float((torch.cat(bf16_ours) - expected).norm() / expected.norm())
    their_error = float((theirs_bf16 - expected).norm() / expected.norm())
    assert our_error <= 2 * their_error + 1e-3, (our_error, their_error)


def test_config_and_tokenizer_come_from_the_metadata(bases, tmp_path) -> None:
    gguf_path = write_case(bases, tmp_path, "llama-Q8_0")
    directory = gguf_model_directory(gguf_path)
    assert gguf_model_directory(gguf_path) == directory  # made once per file
    ours = Tokenizer.load(str(directory))
    original = AutoTokenizer.from_pretrained(bases["llama"])
    text = "The engine serves GGUF files <|im_start|>"
    assert ours.hf(text)["input_ids"] == original(text)["input_ids"]


def test_gguf_flag_errors_name_the_flag(bases, tmp_path) -> None:
    gguf_path = write_case(bases, tmp_path, "llama-Q4_0")
    with pytest.raises(ModelLoadError, match="--quantization int8: .* is a GGUF file"):
        load_model(ModelConfig(model=str(gguf_path), quantization="int8"))
    with pytest.raises(ModelLoadError, match="--quantization gguf: .* holds no .gguf file"):
        load_model(ModelConfig(model=str(bases["llama"]), quantization="gguf"))


def test_a_file_that_is_not_gguf_is_named(tmp_path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(ModelConfig(model=str(broken)))
