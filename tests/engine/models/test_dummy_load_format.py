"""--load-format dummy: a model served from its config.json alone, with random weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from family_configs import family_config

from protoserve.cli.serve import build_parser, engine_config_from_args
from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.frontend.llm import LLM
from engine.models.loader import load_model, resolve_device
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def config_only_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's directory without its weights."""
    target = tmp_path_factory.mktemp("config-only")
    for path in tiny_llama_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, target / path.name)
    return target


def test_without_weights_only_the_dummy_format_loads(config_only_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(ModelConfig(str(config_only_dir), dtype="float32", device="cpu"))
    loaded = load_model(ModelConfig(str(config_only_dir), dtype="float32", device="cpu",
                                    load_format="dummy"))
    std = float(loaded.hf_config.initializer_range)
    for name, param in loaded.model.named_parameters():
        if param.dim() == 1:  # norm scales
            assert torch.equal(param, torch.ones_like(param)), name
        else:  # drawn like transformers' own init: N(0, initializer_range)
            assert abs(param.float().std().item() - std) < 0.2 * std, name
            assert abs(param.float().mean().item()) < 0.05 * std + 1e-3, name


def test_dummy_weights_follow_the_seed(config_only_dir: Path) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        config = ModelConfig(str(config_only_dir), dtype="float32", device="cpu",
                             load_format="dummy", seed=seed)
        return dict(load_model(config).model.named_parameters())

    first, again, other = weights(0), weights(0), weights(1)
    matrices = [name for name, param in first.items() if param.dim() > 1]
    assert matrices
    assert all(torch.equal(first[name], again[name]) for name in matrices)
    assert not any(torch.equal(first[name], other[name]) for name in matrices)


def test_a_dummy_model_generates_in_bf16(config_only_dir: Path) -> None:
    llm = LLM(str(config_only_dir), dtype="bfloat16", device="cpu", load_format="dummy",
              kv_cache_memory=16 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([[5, 6, 7, 8], [9, 10]], params)
    assert [len(out.token_ids) for out in outputs] == [12, 12]
    vocab = llm.runner.loaded.vocab_size
    assert all(0 <= t < vocab for out in outputs for t in out.token_ids)


def test_cli_flags_reach_the_model_config(config_only_dir: Path) -> None:
    args = build_parser().parse_args(["--device", "cpu", "--load-format", "dummy"])
    model = engine_config_from_args(args, str(config_only_dir)).model
    assert (model.device, model.load_format) == ("cpu", "dummy")
    with pytest.raises(ValueError, match="load_format"):
        ModelConfig(str(config_only_dir), load_format="gguf")
    with pytest.raises(ValueError, match="device"):
        ModelConfig(str(config_only_dir), device="tpu")


def test_auto_device_is_cuda_only_when_one_is_visible() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            resolve_device("cuda")


def test_dummy_gemma_norms_are_identity_scales(tmp_path: Path) -> None:
    """Gemma stores its norm scale as an offset (applied as 1 + w): random weights fill it with
    0, not 1, so the dummy model keeps a real model's activation scale."""
    config = family_config(
        "gemma2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    config.architectures = ["Gemma2ForCausalLM"]
    config.save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(str(tmp_path), dtype="float32", device="cpu",
                                    load_format="dummy"))
    norms = [(n, p) for n, p in loaded.model.named_parameters() if "norm" in n]
    assert len(norms) == 2 * 4 + 1
    for name, param in norms:
        assert torch.equal(param, torch.zeros_like(param)), name
