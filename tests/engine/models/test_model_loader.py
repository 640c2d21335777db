"""Loading checkpoints: errors are one clear line; limits and special tokens come from the files."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.layers.rotary import RopeSpec, read_rope_spec
from engine.models.loader import load_model, resolve_model_path

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def load(model_dir: Path, **overrides: object) -> object:
    return load_model(ModelConfig(model=str(model_dir), dtype="float32", **overrides))


def assert_one_line(error: pytest.ExceptionInfo[ModelLoadError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_directory_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as error:
        load(missing)
    assert str(missing) in assert_one_line(error)


def test_hub_id_resolves_through_the_local_cache(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    model_dir, _ = tiny_checkpoint(LlamaConfig(**SMALL))
    # The hub cache layout: models--{org}--{name}/refs/main names a snapshot directory.
    cache = tmp_path / "hub-cache"
    repo = cache / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    model_dir.rename(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("acme/tiny-llama") == snapshot
    assert load_model(ModelConfig(model="acme/tiny-llama", dtype="float32")).vocab_size == 128
    with pytest.raises(ModelLoadError) as error:
        resolve_model_path("acme/not-cached")
    assert "acme/not-cached" in assert_one_line(error)


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ModelLoadError) as error:
        load(tmp_path)
    message = assert_one_line(error)
    assert "GPT2LMHeadModel" in message
    for supported in (
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM", "MixtralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
        "Phi3ForCausalLM", "GraniteForCausalLM",
    ):
        assert supported in message


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load(tmp_path)
    assert "config.json" in assert_one_line(error)


def test_missing_safetensors(tiny_checkpoint) -> None:
    model_dir, _ = tiny_checkpoint(LlamaConfig(**SMALL))
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError) as error:
        load(model_dir)
    assert "safetensors" in assert_one_line(error)


def test_missing_tensor_is_named(tiny_checkpoint) -> None:
    model_dir, _ = tiny_checkpoint(LlamaConfig(**SMALL))
    weights_path = model_dir / "model.safetensors"
    tensors = load_file(weights_path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights_path)
    with pytest.raises(ModelLoadError) as error:
        load(model_dir)
    assert "layers.1.self_attn.qkv_proj.weight" in assert_one_line(error)


def test_sharded_checkpoint_loads_like_a_single_file(tiny_checkpoint) -> None:
    model_dir, hf_model = tiny_checkpoint(LlamaConfig(**SMALL))
    hf_model.save_pretrained(model_dir, max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    loaded = load(model_dir)
    expected = hf_model.model.layers[1].mlp.up_proj.weight
    actual = loaded.model.model.layers[1].mlp.gate_up_proj.weight[SMALL["intermediate_size"] :]
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_max_model_len_defaults_to_and_is_bounded_by_the_model(tiny_checkpoint) -> None:
    model_dir, _ = tiny_checkpoint(LlamaConfig(**SMALL))
    assert load(model_dir).max_model_len == 512
    assert load(model_dir, max_model_len=100).max_model_len == 100
    with pytest.raises(ModelLoadError) as error:
        load(model_dir, max_model_len=513)
    assert "513" in assert_one_line(error)


def test_sliding_window_applies_per_layer_without_capping_the_context(tiny_checkpoint) -> None:
    model_dir, _ = tiny_checkpoint(MistralConfig(**SMALL, sliding_window=64))
    loaded = load(model_dir)
    assert loaded.architecture == "MistralForCausalLM"
    # The attention honours the window, so the served context is the model's whole length.
    assert loaded.max_model_len == 512
    assert loaded.model.dims.layer_windows == (64, 64)
    # Qwen2 keeps a sliding_window value that is inactive unless use_sliding_window is set.
    qwen_dir, _ = tiny_checkpoint(Qwen2Config(**SMALL, sliding_window=64, use_sliding_window=False))
    qwen = load(qwen_dir)
    assert qwen.max_model_len == 512
    assert qwen.model.dims.layer_windows == (None, None)


def test_special_tokens_from_config_and_generation_config(tiny_checkpoint) -> None:
    model_dir, _ = tiny_checkpoint(LlamaConfig(**SMALL, bos_token_id=1, eos_token_id=2))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    loaded = load(model_dir)
    assert loaded.eos_token_ids == frozenset({2, 7, 9})
    assert loaded.bos_token_id == 1
    assert loaded.vocab_size == 128
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.head_dim) == (2, 2, 16)


def test_auto_dtype_is_bfloat16_on_cpu(tiny_checkpoint) -> None:
    model_dir, _ = tiny_checkpoint(LlamaConfig(**SMALL))
    loaded = load_model(ModelConfig(model=str(model_dir)))
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_rope_spec_reads_both_config_layouts() -> None:
    new_style = SimpleNamespace(rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
    assert read_rope_spec(new_style) == RopeSpec(500.0, "default", new_style.rope_parameters)
    old_style = SimpleNamespace(rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0})
    spec = read_rope_spec(old_style)
    assert (spec.theta, spec.rope_type, spec.scaling["factor"]) == (1000.0, "linear", 2.0)
    plain = SimpleNamespace(rope_theta=10.0, rope_scaling=None)
    assert read_rope_spec(plain) == RopeSpec(10.0, "default", {})
