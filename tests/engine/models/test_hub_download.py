"""`--model org/name`: downloads through huggingface_hub from a local Hub endpoint
(tests/hub_endpoint.py), loads and generates as the same model's local directory does;
`--revision`, the cache (no request on a second start), `--load-format pt`, and one clear
line for each way a download fails."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hub_endpoint import HubEndpoint
from model_factory import build_tiny_model
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.frontend.llm import LLM
from engine.models.hub import download_snapshot, local_model_config
from engine.sampling_params import SamplingParams
from protoserve.cli.serve import build_parser, engine_config_from_args

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEndpoint]:
    with HubEndpoint() as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint.url)
        yield endpoint


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf-cache")


def generate(model: str, **kwargs: object) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model, dtype="float32", device="cpu", num_kv_blocks=64, **kwargs)
    return llm, [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]


def pt_checkpoint(model_dir: Path, target: Path) -> Path:
    """The same model with its weights as a torch.save'd state dict in pytorch_model.bin."""
    shutil.copytree(model_dir, target)
    (target / "model.safetensors").unlink()
    torch.save(load_file(model_dir / "model.safetensors"), target / "pytorch_model.bin")
    return target


def one_line(error: pytest.ExceptionInfo[ModelLoadError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_hub_id_downloads_and_generates_as_the_local_directory(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path
) -> None:
    hub.add_commit("acme/tiny-llama", tiny_llama_dir)
    llm, tokens = generate("acme/tiny-llama", download_dir=cache)
    _, local_tokens = generate(str(tiny_llama_dir))
    assert tokens == local_tokens
    model = llm.config.model
    assert model.served_model_names == ("acme/tiny-llama",)
    snapshot = Path(model.model)
    assert snapshot.is_relative_to(Path(cache).resolve())
    # The tokenizer loaded from the same snapshot.
    assert llm.tokenizer is not None
    assert (snapshot / "tokenizer.json").read_bytes() == (tiny_llama_dir / "tokenizer.json").read_bytes()
    assert llm.tokenizer.encode("hello there", add_special_tokens=False) == \
        generate_tokenizer_ids(tiny_llama_dir, "hello there")


def generate_tokenizer_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=False)


def test_second_start_uses_the_cache_without_a_request(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path
) -> None:
    hub.add_commit("acme/tiny-llama", tiny_llama_dir)
    first = download_snapshot("acme/tiny-llama", cache_dir=cache)
    assert any(path.endswith("model.safetensors") for _, path in hub.requests)
    hub.clear_requests()
    assert download_snapshot("acme/tiny-llama", cache_dir=cache) == first
    config = local_model_config(ModelConfig("acme/tiny-llama", download_dir=cache))
    assert Path(config.model) == first
    assert hub.requests == []


def test_revision_picks_that_commits_files(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    other = build_tiny_model(tmp_path / "other", seed=1)
    main_sha = hub.add_commit("acme/tiny-llama", tiny_llama_dir)
    v2_sha = hub.add_commit("acme/tiny-llama", other, refs=("v2",))
    v2 = download_snapshot("acme/tiny-llama", revision="v2", cache_dir=cache)
    main = download_snapshot("acme/tiny-llama", cache_dir=cache)
    pinned = download_snapshot("acme/tiny-llama", revision=main_sha, cache_dir=cache)
    assert (v2.name, main.name, pinned.name) == (v2_sha, main_sha, main_sha)
    weights = "model.safetensors"
    assert (v2 / weights).read_bytes() == (other / weights).read_bytes()
    assert (main / weights).read_bytes() == (tiny_llama_dir / weights).read_bytes()
    assert (v2 / weights).read_bytes() != (main / weights).read_bytes()


def test_offline_with_an_empty_cache_is_one_clear_line(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_commit("acme/tiny-llama", tiny_llama_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as error:
        LLM("acme/tiny-llama", download_dir=cache)
    message = one_line(error)
    assert "acme/tiny-llama" in message and "HF_HUB_OFFLINE" in message
    assert hub.requests == []


def test_offline_with_the_model_cached_loads_it(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_commit("acme/tiny-llama", tiny_llama_dir)
    snapshot = download_snapshot("acme/tiny-llama", cache_dir=cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert download_snapshot("acme/tiny-llama", cache_dir=cache) == snapshot


@pytest.mark.parametrize(("repo_id", "revision", "expected"), [
    ("acme/missing", None, "model acme/missing not found on http"),
    ("acme/tiny-llama", "v9", "revision 'v9' (--revision) not found in acme/tiny-llama"),
    ("acme/gated", None, "model acme/gated is gated"),
])
def test_hub_errors_are_one_clear_line(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path, repo_id: str, revision: str | None,
    expected: str,
) -> None:
    hub.add_commit("acme/tiny-llama", tiny_llama_dir)
    hub.add_commit("acme/gated", tiny_llama_dir, gated=True)
    with pytest.raises(ModelLoadError) as error:
        download_snapshot(repo_id, revision=revision, cache_dir=cache)
    assert expected in one_line(error)
    assert not (Path(cache) / "models--acme--tiny-llama" / "snapshots").exists()


def test_unreachable_hub_is_one_clear_line(
    cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HubEndpoint() as closed:
        url = closed.url  # nothing listens there once it has shut down
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(ModelLoadError) as error:
        download_snapshot("acme/tiny-llama", cache_dir=cache)
    message = one_line(error)
    assert f"cannot reach {url}" in message and "acme/tiny-llama" in message


def test_pt_checkpoint_generates_the_safetensors_tokens(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    hub.add_commit("acme/tiny-pt", pt_checkpoint(tiny_llama_dir, tmp_path / "pt"))
    _, pt_tokens = generate("acme/tiny-pt", download_dir=cache)  # auto: no safetensors -> pt
    _, st_tokens = generate(str(tiny_llama_dir))
    assert pt_tokens == st_tokens
    with pytest.raises(ModelLoadError) as error:
        download_snapshot("acme/tiny-pt", cache_dir=cache, load_format="safetensors")
    message = one_line(error)
    assert "--load-format safetensors" in message and "pytorch_model.bin" in message


def test_auto_downloads_only_the_safetensors_when_both_are_there(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    both = pt_checkpoint(tiny_llama_dir, tmp_path / "both")
    shutil.copy(tiny_llama_dir / "model.safetensors", both / "model.safetensors")
    (both / "training_args.bin").write_bytes(b"not weights")
    hub.add_commit("acme/both", both)
    snapshot = download_snapshot("acme/both", cache_dir=cache)
    assert (snapshot / "model.safetensors").is_file()
    assert not (snapshot / "pytorch_model.bin").exists()
    assert not (snapshot / "training_args.bin").exists()
    pt = download_snapshot("acme/both", cache_dir=cache, load_format="pt")
    assert (pt / "pytorch_model.bin").is_file() and not (pt / "training_args.bin").exists()


def test_cli_flags_download_once_and_keep_the_hub_id_as_the_name(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path
) -> None:
    hub.add_commit("acme/tiny-llama", tiny_llama_dir, refs=("main", "v1"))
    args = build_parser().parse_args([
        "--revision", "v1", "--tokenizer-revision", "main", "--download-dir", cache,
        "--load-format", "safetensors", "--device", "cpu",
    ])
    model = engine_config_from_args(args, "acme/tiny-llama").model
    assert model.served_model_names == ("acme/tiny-llama",)
    assert Path(model.model).is_dir() and model.tokenizer is not None
    assert Path(model.tokenizer).is_dir()
    assert (model.revision, model.tokenizer_revision, model.download_dir, model.load_format) == (
        "v1", "main", cache, "safetensors")
    # Every process after this one gets the snapshot directory: nothing asks the Hub again.
    hub.clear_requests()
    assert local_model_config(model) == model
    assert hub.requests == []
    with pytest.raises(ValueError, match="load_format must be one of auto, safetensors, pt, dummy"):
        ModelConfig("acme/tiny-llama", load_format="gguf")


def test_tokenizer_hub_id_downloads_the_tokenizer_alone(
    hub: HubEndpoint, cache: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    hub.add_commit("acme/tiny-llama", tiny_llama_dir)
    hub.add_commit("acme/tokenizer", tiny_llama_dir, refs=("v3",))
    config = local_model_config(ModelConfig("acme/tiny-llama", tokenizer="acme/tokenizer",
                                            tokenizer_revision="v3", download_dir=cache))
    assert config.tokenizer is not None
    tokenizer_dir = Path(config.tokenizer)
    assert tokenizer_dir.parent.parent.name == "models--acme--tokenizer"
    assert (tokenizer_dir / "tokenizer.json").is_file()
    assert not (tokenizer_dir / "model.safetensors").exists()
