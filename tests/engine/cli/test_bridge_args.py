"""engine-serve hands its bridge flags on: the child's command line parses with the bridge's
own parser into the settings those flags mean (no process started)."""
from __future__ import annotations

from protoserve.cli.bridge_child import bridge_args
from protoserve.cli.serve import build_parser

from rest_bridge.cli import build_parser as bridge_parser
from rest_bridge.cli import settings_from_args


def _bridge_settings(*serve_flags: str):
    serve = build_parser().parse_args(list(serve_flags))
    argv = ["--engine-address", "127.0.0.1:1", *bridge_args(serve)]
    return settings_from_args(bridge_parser().parse_args(argv))


def test_defaults_reach_the_bridge_unchanged() -> None:
    settings = _bridge_settings()
    assert not settings.chat.enable_prompt_tokens_details
    assert not settings.chat.return_tokens_as_token_ids
    assert not settings.chat.enable_auto_tool_choice


def test_feature_flags_reach_the_bridge() -> None:
    settings = _bridge_settings(
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--enable-prompt-tokens-details", "--return-tokens-as-token-ids",
        "--request-timeout", "7", "--port", "8123")
    assert settings.chat.enable_prompt_tokens_details
    assert settings.chat.return_tokens_as_token_ids
    assert settings.chat.enable_auto_tool_choice and settings.chat.tool_call_parser == "hermes"
    assert settings.request_timeout == 7.0 and settings.port == 8123
