"""Request defaults from a model's generation_config.json (--generation-config auto|vllm|PATH,
--override-generation-config), read as the reference server reads them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.models.generation_config import generation_defaults


def _model_dir(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return tmp_path


def test_auto_reads_the_sampling_fields_of_the_model(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                  "repetition_penalty": 1.05, "max_new_tokens": 512,
                                  "do_sample": True, "eos_token_id": [1, 2], "bos_token_id": 0})
    assert dict(generation_defaults("auto", str(model))) == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05,
        "max_tokens": 512}


def test_vllm_keeps_the_engine_defaults_and_overrides_still_apply(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {"temperature": 0.6})
    assert generation_defaults("vllm", str(model)) == ()
    assert generation_defaults("vllm", str(model), {"temperature": 0.2}) == (("temperature", 0.2),)


def test_a_path_and_overrides_by_either_name(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    _model_dir(other, {"top_k": -1, "min_p": 0.05})
    defaults = dict(generation_defaults(str(other), str(tmp_path),
                                        {"max_new_tokens": 64, "top_p": 0.5}))
    # top_k -1 is the reference's "disabled", the engine's 0.
    assert defaults == {"top_k": 0, "min_p": 0.05, "max_tokens": 64, "top_p": 0.5}
    assert generation_defaults(str(other / "generation_config.json"), "unused")


def test_a_model_without_the_file_has_no_defaults(tmp_path: Path) -> None:
    assert generation_defaults("auto", str(tmp_path)) == ()


@pytest.mark.parametrize("source, overrides, message", [
    ("auto", {"seed": 3}, "not one of"),
    ("auto", {"temperature": "hot"}, "must be a number"),
    ("/no/such/dir", None, "no generation_config.json"),
])
def test_bad_sources_and_overrides_are_one_line_errors(tmp_path: Path, source, overrides,
                                                       message) -> None:
    with pytest.raises(ValueError, match=message):
        generation_defaults(source, str(tmp_path), overrides)
