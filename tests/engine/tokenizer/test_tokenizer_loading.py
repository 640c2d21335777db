"""Tokenizer.load: directories, the offline hub cache, transformers 5 layouts, template sources."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from model_factory import CHATML_TEMPLATE, make_tiny_tokenizer, save_tiny_tokenizer
from transformers import AutoTokenizer

from engine.errors import ModelLoadError
from engine.tokenizer import Tokenizer

SAMPLES = (
    "The harbor woke before the town did.",
    "Café 今日は 🙂 Καλημέρα",
    " spaced  out \n",
)
USER_HELLO = [{"role": "user", "content": "Hello"}]
TOOL_TEMPLATE = "TOOLS:{{ tools | length }}"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_matches_transformers(tokenizer_dir: Path) -> None:
    tokenizer = Tokenizer.load(str(tokenizer_dir))
    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert tokenizer.eos_token_id == reference.eos_token_id
    im_tokens = reference.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizer.all_special_ids == {reference.bos_token_id, reference.eos_token_id, *im_tokens}
    assert tokenizer.has_chat_template
    for text in SAMPLES:
        for add_special_tokens in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
            assert ids == reference.encode(text, add_special_tokens=add_special_tokens)
            for skip in (True, False):
                expected = reference.decode(ids, skip_special_tokens=skip)
                assert tokenizer.decode(ids, skip_special_tokens=skip) == expected
            assert tokenizer.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=True)) == text


def test_missing_directory_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as raised:
        Tokenizer.load(str(tmp_path / "nowhere"))
    assert "\n" not in str(raised.value)


def test_directory_without_tokenizer_is_a_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as raised:
        Tokenizer.load(str(tmp_path))
    assert "\n" not in str(raised.value) and "tokenizer" in str(raised.value)


def test_corrupt_tokenizer_is_a_model_load_error(tmp_path: Path, tokenizer_dir: Path) -> None:
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"')
    with pytest.raises(ModelLoadError) as raised:
        Tokenizer.load(str(tmp_path))
    assert "\n" not in str(raised.value)


def test_hub_id_resolves_through_the_offline_cache(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_dir = tmp_path / "models--example-org--tiny-chat"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tokenizer_dir, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    tokenizer = Tokenizer.load("example-org/tiny-chat")
    assert tokenizer.encode("Hi", add_special_tokens=False)
    with pytest.raises(ModelLoadError) as raised:
        Tokenizer.load("example-org/not-cached")
    assert "example-org/not-cached" in str(raised.value)


def test_unknown_tokenizer_class_falls_back_to_the_generic_fast_tokenizer(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "SomeFutureTokenizerClass"
    config_path.write_text(json.dumps(config))
    tokenizer = Tokenizer.load(str(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.encode(SAMPLES[1], add_special_tokens=True) == reference.encode(SAMPLES[1])


def test_template_inside_tokenizer_config(tmp_path: Path) -> None:
    make_tiny_tokenizer().save_pretrained(tmp_path, save_jinja_files=False)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    rendered = Tokenizer.load(str(tmp_path)).render_chat(USER_HELLO)
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    assert rendered == reference.apply_chat_template(USER_HELLO, tokenize=False,
                                                     add_generation_prompt=True)


def _write_named_templates(directory: Path, *, as_files: bool) -> None:
    templates = {"default": CHATML_TEMPLATE, "tool_use": TOOL_TEMPLATE, "brief": "BRIEF"}
    tokenizer = make_tiny_tokenizer(chat_template=None)
    tokenizer.chat_template = templates
    tokenizer.save_pretrained(directory, save_jinja_files=as_files)


@pytest.mark.parametrize("as_files", [True, False], ids=["jinja-files", "config-list"])
def test_named_templates(tmp_path: Path, as_files: bool) -> None:
    _write_named_templates(tmp_path, as_files=as_files)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert isinstance(config.get("chat_template"), list) is not as_files
    tokenizer = Tokenizer.load(str(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert tokenizer.render_chat(USER_HELLO) == reference.apply_chat_template(
        USER_HELLO, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.render_chat(USER_HELLO, tools=tools) == "TOOLS:1"
    assert tokenizer.render_chat(USER_HELLO, chat_template="brief") == "BRIEF"


def test_server_template_overrides_the_models_and_requests_override_both(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    template_file = tmp_path / "server.jinja"
    template_file.write_text("SERVER {{ messages[0].content }}")
    from_file = Tokenizer.load(str(tokenizer_dir), chat_template=str(template_file))
    assert from_file.render_chat(USER_HELLO) == "SERVER Hello"
    from_text = Tokenizer.load(str(tokenizer_dir), chat_template="TEXT {{ bos_token }}")
    assert from_text.render_chat(USER_HELLO) == "TEXT <|begin_of_text|>"
    assert from_text.render_chat(USER_HELLO, chat_template="REQ") == "REQ"


def test_server_template_gives_a_template_to_a_model_without_one(tmp_path: Path) -> None:
    directory = save_tiny_tokenizer(tmp_path / "tok", chat_template=None)
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML_TEMPLATE)
    tokenizer = Tokenizer.load(str(directory), chat_template=str(template_file))
    assert tokenizer.has_chat_template
    assert tokenizer.render_chat(USER_HELLO).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("missing/template.jinja", "no such file"), ("{% for %}", "does not compile")],
)
def test_bad_server_template_is_a_model_load_error(
    tokenizer_dir: Path, value: str, fragment: str
) -> None:
    with pytest.raises(ModelLoadError) as raised:
        Tokenizer.load(str(tokenizer_dir), chat_template=value)
    assert fragment in str(raised.value)
