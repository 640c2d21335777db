"""engine-serve's output-parser flags. The parsers run in engine-serve's serving process
(engine.output_parsing), so a plugin file is loaded there, and the parser names the bridge
flags give (--tool-call-parser, --reasoning-parser, declared by rest_bridge.chat_options for
both processes) are checked there, at start-up, against what is registered."""
from __future__ import annotations

import argparse

from engine.output_parsing import REASONING_PARSERS, TOOL_PARSERS
from engine.output_parsing.plugins import load_tool_parser_plugin


def add_output_parser_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tool-parser-plugin", default=None, metavar="FILE",
                   help="a Python file that registers tool-call parsers with "
                   "engine.output_parsing.register_tool_parser (name them with "
                   "--tool-call-parser)")


def check_output_parser_args(args: argparse.Namespace) -> None:
    """Load the plugin, then raise ValueError (one line, the flag named) for a parser name
    nothing registered."""
    if args.tool_parser_plugin:
        load_tool_parser_plugin(args.tool_parser_plugin)
    if args.tool_call_parser is not None and args.tool_call_parser not in TOOL_PARSERS:
        names = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"--tool-call-parser {args.tool_call_parser!r} is not a registered "
                         f"tool parser (one of {names})")
    if args.reasoning_parser is not None and args.reasoning_parser not in REASONING_PARSERS:
        names = ", ".join(REASONING_PARSERS)
        raise ValueError(f"--reasoning-parser must be one of {names}")


def parsing_defaults(args: argparse.Namespace) -> dict[str, str]:
    """The ServingOptions fields these flags set: the parsers gRPC chat requests that name
    none of their own get."""
    return {
        "reasoning_parser": args.reasoning_parser or "",
        "auto_tool_parser": (args.tool_call_parser or "") if args.enable_auto_tool_choice else "",
    }
