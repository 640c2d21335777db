"""The built-in demo model: deterministic build, atomic caching, loadable by transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import engine.demo.builder as builder
from engine.demo import DEMO_MODEL_NAME, build_demo_model, ensure_demo_model
from engine.tokenizer import Tokenizer

MULTILINGUAL = "Café au lait, Καλημέρα, 今日は天気がいい, 도서관 🙂🎉 ±∞"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built through the cache-dir environment variable, as `engine-serve` does."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(builder.CACHE_DIR_ENV, str(cache))
        directory = ensure_demo_model()
    assert directory == cache / DEMO_MODEL_NAME
    return directory


def test_second_build_is_byte_identical(demo_dir: Path, tmp_path: Path) -> None:
    build_demo_model(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_cached_model_is_returned_without_rebuilding(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(directory: Path) -> None:
        raise AssertionError("the cached demo model was rebuilt")

    monkeypatch.setattr(builder, "build_demo_model", fail)
    assert ensure_demo_model(demo_dir.parent) == demo_dir


def test_a_concurrent_winner_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process renames its finished build into place while this one builds."""
    target = tmp_path / DEMO_MODEL_NAME

    def build_while_another_process_finishes(directory: Path) -> None:
        (directory / "mine.txt").write_text("loser")
        target.mkdir()
        (target / "winner.txt").write_text("winner")

    monkeypatch.setattr(builder, "build_demo_model", build_while_another_process_finishes)
    assert ensure_demo_model(tmp_path) == target
    assert sorted(path.name for path in target.iterdir()) == ["winner.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [DEMO_MODEL_NAME]


def test_tokenizer_round_trips_multibyte_text(demo_dir: Path) -> None:
    tokenizer = Tokenizer.load(str(demo_dir))
    reference = AutoTokenizer.from_pretrained(str(demo_dir))
    ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=True)
    assert ids == reference.encode(MULTILINGUAL)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == MULTILINGUAL
    assert 1900 <= tokenizer.vocab_size <= 2100
    names = reference.convert_ids_to_tokens(sorted(tokenizer.all_special_ids))
    assert names == ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]


def test_chat_template_is_chatml(demo_dir: Path) -> None:
    reference = AutoTokenizer.from_pretrained(str(demo_dir))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert Tokenizer.load(str(demo_dir)).render_chat(conversation) == rendered


def test_transformers_loads_and_runs_the_model(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir))
    model = AutoModelForCausalLM.from_pretrained(str(demo_dir), dtype=torch.float32)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers) == (256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 4)
    assert (config.intermediate_size, config.max_position_embeddings) == (704, 2048)
    assert config.vocab_size == len(tokenizer) and config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([tokenizer.encode("The harbor woke")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert "random" in (demo_dir / "README.md").read_text()
