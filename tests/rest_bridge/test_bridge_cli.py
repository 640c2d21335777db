"""`engine-bridge` arguments and settings."""
from __future__ import annotations

import subprocess
import sys

import pytest
from bridge_processes import REPO_ROOT

from rest_bridge.cli import API_KEY_ENV, build_parser, settings_from_args
from rest_bridge.settings import BridgeSettings, validate_engine_address


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:50051", "engine.internal:1", "[::1]:50051", "unix:/tmp/e.sock",
     "unix:///tmp/e.sock"],
)
def test_valid_engine_addresses(address: str) -> None:
    assert validate_engine_address(address) == address


@pytest.mark.parametrize("address", ["localhost", ":50051", "host:", "host:port", "host:70000",
                                     "unix:", "unix://"])
def test_invalid_engine_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        validate_engine_address(address)


def test_arguments_become_frozen_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = build_parser().parse_args(
        ["--engine-address", "unix:/run/e.sock", "--port", "9000", "--root-path", "/api",
         "--request-timeout", "30", "--uvicorn-log-level", "warning"])
    settings = settings_from_args(args)
    assert settings == BridgeSettings(
        engine_address="unix:/run/e.sock", host="127.0.0.1", port=9000, request_timeout=30.0,
        api_key=None, root_path="/api", uvicorn_log_level="warning")
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert settings_from_args(args).api_key == "from-env"


def test_prompt_tokens_details_flag() -> None:
    parser = build_parser()
    args = ["--engine-address", "127.0.0.1:1"]
    assert not settings_from_args(parser.parse_args(args)).chat.enable_prompt_tokens_details
    enabled = settings_from_args(parser.parse_args([*args, "--enable-prompt-tokens-details"]))
    assert enabled.chat.enable_prompt_tokens_details


def test_bad_arguments_exit_with_usage() -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--engine-address", "nowhere"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
    with pytest.raises(ValueError):
        BridgeSettings(engine_address="h:1", request_timeout=0)


def test_module_entry_point_prints_help() -> None:
    result = subprocess.run([sys.executable, "-m", "rest_bridge", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "--engine-address" in result.stdout and "--root-path" in result.stdout
