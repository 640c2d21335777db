"""Tool-call parsers: model output text -> OpenAI-shaped tool calls (see base.py).

TOOL_PARSERS maps a `--tool-call-parser` name to its class. It is filled here at import and
by `--tool-parser-plugin` files at start-up (engine.output_parsing.plugins), never while
requests run.
"""
from __future__ import annotations

from collections.abc import Callable

from engine.output_parsing.tool_parsers.base import (
    MarkerToolStream,
    NamedFunctionStream,
    ParsedCall,
    RegionParser,
    StreamPiece,
    ToolCallStream,
    ToolParser,
    extract,
    merge_pieces,
)
from engine.output_parsing.tool_parsers.hermes import HermesParser
from engine.output_parsing.tool_parsers.json_calls import (
    Llama3JsonParser,
    MistralParser,
    RequiredParser,
)
from engine.output_parsing.tool_parsers.pythonic import PythonicParser
from engine.output_parsing.tool_parsers.qwen3_coder import Qwen3CoderParser
from engine.output_parsing.tool_parsers.tagged_json import (
    DeepSeekV3Parser,
    GraniteParser,
    InternLMParser,
    JambaParser,
)

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
    "qwen3_coder": Qwen3CoderParser,
    "deepseek_v3": DeepSeekV3Parser,
    "granite": GraniteParser,
    "internlm": InternLMParser,
    "jamba": JambaParser,
}


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    """Class decorator a plugin file uses: `@register_tool_parser("my_format")` on a
    ToolParser subclass makes `--tool-call-parser my_format` choose it."""
    if not name or not isinstance(name, str):
        raise ValueError("a tool parser needs a non-empty name")

    def register(cls: type[ToolParser]) -> type[ToolParser]:
        if not (isinstance(cls, type) and issubclass(cls, ToolParser)):
            raise TypeError(f"tool parser {name!r} must subclass ToolParser")
        TOOL_PARSERS[name] = cls
        return cls

    return register


__all__ = [
    "TOOL_PARSERS",
    "MarkerToolStream",
    "NamedFunctionStream",
    "ParsedCall",
    "RegionParser",
    "RequiredParser",
    "StreamPiece",
    "ToolCallStream",
    "ToolParser",
    "extract",
    "merge_pieces",
    "register_tool_parser",
]
