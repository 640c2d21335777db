"""engine-serve's LoRA options as the reference server spells them: both --lora-modules forms,
the runtime-updating flag or environment variable, and one-line errors."""
from __future__ import annotations

import json

import pytest

from engine.config import LoRAModule
from protoserve.cli.lora_args import RUNTIME_UPDATING_ENV, lora_config_from_args
from protoserve.cli.serve import build_parser


def _config(*argv: str):
    return lora_config_from_args(build_parser().parse_args(list(argv)))


def test_both_module_forms_and_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUNTIME_UPDATING_ENV, raising=False)
    beta = json.dumps({"name": "beta", "path": "/a/beta", "base_model_name": "base"})
    config = _config("--enable-lora", "--lora-modules", "alpha=/a/alpha", beta,
                     "--max-loras", "3", "--max-lora-rank", "64", "--max-cpu-loras", "5")
    assert config.modules == (LoRAModule("alpha", "/a/alpha"),
                              LoRAModule("beta", "/a/beta", "base"))
    assert (config.max_loras, config.max_lora_rank, config.cpu_loras) == (3, 64, 5)
    assert not config.allow_runtime_updating
    assert _config() is None


@pytest.mark.parametrize("value", ["True", "true", "1"])
def test_runtime_updating_by_flag_or_the_reference_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.delenv(RUNTIME_UPDATING_ENV, raising=False)
    assert _config("--enable-lora", "--allow-runtime-lora-updating").allow_runtime_updating
    monkeypatch.setenv(RUNTIME_UPDATING_ENV, value)
    assert _config("--enable-lora").allow_runtime_updating


@pytest.mark.parametrize("module, message", [
    ("no-equals-sign", "expected name=path or a JSON object"),
    ('{"name": "x"}', 'the JSON form needs "name" and "path"'),
    ('{"name": "x", "path": "/p", "rank": 4}', "unknown keys rank"),
])
def test_bad_modules_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], module: str, message: str
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--enable-lora", "--lora-modules", module])
    assert f"argument --lora-modules: {message}" in capsys.readouterr().err


def test_options_that_need_enable_lora_or_sane_limits_say_so() -> None:
    with pytest.raises(ValueError, match="--lora-modules needs --enable-lora"):
        _config("--lora-modules", "a=/p")
    with pytest.raises(ValueError, match=r"--max-cpu-loras\) must be >= max_loras"):
        _config("--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2")
