"""compressed-tensors W8A8 checkpoints (int8 weights per channel, int8 activations per token,
written by the library) against transformers running the same file: transformers loads it
through compressed-tensors, which decompresses the weights and fake-quantizes every
projection's input per token with its own quantizer.

float32: our torch path equals it to 1e-4 and greedy decoding picks the same tokens. bfloat16
on the native W8A8 kernel: no further from that reference than transformers' own bf16 run of
the file is.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_factory import build_tiny_model
from quant_checkpoints import (
    greedy_against_reference,
    reference_logits,
    write_compressed_tensors,
)
from transformers import AutoModelForCausalLM

from engine import quantized_ops
from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.layers.quantized_linear import QuantizedLinear
from engine.models.loader import load_model

SHAPE = dict(hidden_size=160, num_heads=4, num_kv_heads=2, intermediate_size=320,
             initializer_range=0.15)


@pytest.fixture(scope="module")
def w8a8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("w8a8")
    base = build_tiny_model(root / "base", **SHAPE)
    return write_compressed_tensors(base, root / "ct", preset="W8A8", strategy="channel",
                                    group_size=None)


def prompt() -> list[int]:
    return torch.randint(3, 400, (11,), generator=torch.Generator().manual_seed(1)).tolist()


def transformers_model(path: Path, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_float32_equals_transformers_running_the_checkpoint(w8a8_dir) -> None:
    raw = json.loads((w8a8_dir / "config.json").read_text())["quantization_config"]
    assert raw["format"] == "int-quantized"  # what the library writes for W8A8
    loaded = load_model(ModelConfig(model=str(w8a8_dir), dtype="float32"))
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 8 and all(layer.quant.int8_activations for layer in layers)
    assert all(layer.packing == "dequantize" for layer in layers)
    hf = transformers_model(w8a8_dir, torch.float32)
    ours, theirs = greedy_against_reference(loaded, hf, prompt(), steps=6)
    for actual, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        assert int(actual[-1].argmax()) == int(expected[-1].argmax())
    # The activations really are quantized: without it the same weights give other logits.
    for module in hf.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False
    assert (reference_logits(hf, prompt()) - theirs[0]).abs().max() > 1e-3


def test_pack_quantized_storage_loads_the_same(w8a8_dir, tmp_path) -> None:
    """W8A8 written in the library's pack-quantized storage instead of int-quantized."""
    packed = write_compressed_tensors(w8a8_dir.parent / "base", tmp_path / "packed",
                                      preset="W8A8", strategy="channel", group_size=None,
                                      storage_format="pack-quantized")
    raw = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert raw["format"] == "pack-quantized"
    loaded = load_model(ModelConfig(model=str(packed), dtype="float32"))
    hf = transformers_model(packed, torch.float32)
    ours, theirs = greedy_against_reference(loaded, hf, prompt(), steps=3)
    for actual, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not quantized_ops.linear_w8a8_available(),
                    reason="no native CPU ops here")
def test_bfloat16_kernel_tracks_the_float32_reference(w8a8_dir) -> None:
    loaded = load_model(ModelConfig(model=str(w8a8_dir), dtype="bfloat16"))
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert all(layer.packing == "w8a8_panels" for layer in layers)
    hf = transformers_model(w8a8_dir, torch.float32)
    ours, _ = greedy_against_reference(loaded, hf, prompt(), steps=4)
    ids = prompt() + [int(step[-1].argmax()) for step in ours[:-1]]
    expected = reference_logits(hf, ids)
    theirs = reference_logits(transformers_model(w8a8_dir, torch.bfloat16), ids)
    our_error = float((torch.cat(ours) - expected).norm() / expected.norm())
    their_error = float((theirs - expected).norm() / expected.norm())
    assert our_error <= 1.25 * their_error + 1e-3, (our_error, their_error)


def test_unsupported_activation_schemes_name_the_field(w8a8_dir, tmp_path) -> None:
    config = json.loads((w8a8_dir / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"]["strategy"] = "tensor"
    group["input_activations"]["dynamic"] = False
    bad = tmp_path / "bad"
    bad.mkdir()
    for entry in w8a8_dir.iterdir():
        (bad / entry.name).symlink_to(entry)
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"input_activations\.strategy must be \"token\""):
        load_model(ModelConfig(model=str(bad), dtype="float32"))
