"""`engine-serve --help` and `engine-bridge --help`: every option explains itself and shows
its default (no server is started)."""
from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from protoserve.cli.serve import build_parser as engine_serve_parser
from rest_bridge.cli import build_parser as engine_bridge_parser


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions
            if action.option_strings and action.help != argparse.SUPPRESS
            and not isinstance(action, argparse._HelpAction)]


@pytest.mark.parametrize("build", [engine_serve_parser, engine_bridge_parser],
                         ids=["engine-serve", "engine-bridge"])
def test_every_option_has_help_that_shows_its_default(
    build: Callable[[], argparse.ArgumentParser]
) -> None:
    parser = build()
    rendered = parser.format_help()
    formatter = parser._get_formatter()
    for action in _options(parser):
        name = action.option_strings[-1]
        assert action.help, f"{name} has no help text"
        assert name in rendered
        text = formatter._expand_help(action)
        if action.required:
            continue
        assert "default" in text, f"{name}: the help does not say its default: {text!r}"
        if isinstance(action.default, (int, float, str)) and action.default != "":
            # bool is an int: True/False show as such
            assert str(action.default) in text, f"{name}: default {action.default!r} not shown"


def test_the_role_and_scheduler_options_explain_themselves() -> None:
    rendered = " ".join(engine_serve_parser().format_help().split())
    for fragment in ("engine: gRPC only", "(default: all)", "(default: 16)", "(default: 256)",
                     "(default: 2048)", "(default: 50051)", "(default: 8000)"):
        assert fragment in rendered, fragment
