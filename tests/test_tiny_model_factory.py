"""The shared tiny-model factory writes directories transformers loads as the asked-for model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_factory import build_tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_built_model_loads_with_the_requested_shape(tmp_path: Path, arch: str) -> None:
    directory = build_tiny_model(tmp_path, arch=arch, num_layers=3, vocab_size=512, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    assert model.config.model_type == arch
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (3, 512)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert len(tokenizer) <= 512 and tokenizer.chat_template is not None
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
    attention = model.model.layers[0].self_attn
    if arch == "qwen2":
        assert attention.q_proj.bias is not None
        assert attention.q_proj.bias.abs().min() > 0
    else:
        assert attention.q_proj.bias is None


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", seed=5)
    again = build_tiny_model(tmp_path / "b", seed=5)
    other = build_tiny_model(tmp_path / "c", seed=6)
    weights = [(path / "model.safetensors").read_bytes() for path in (first, again, other)]
    assert weights[0] == weights[1] != weights[2]


def test_tiny_llama_fixture_is_a_complete_model_directory(tiny_llama_dir: Path) -> None:
    names = {path.name for path in tiny_llama_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    assert expected <= names
