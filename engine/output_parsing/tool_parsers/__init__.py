"""Tool-call parsers: model output text -> OpenAI `tool_calls` (see base.py)."""
from __future__ import annotations

from collections.abc import Callable

from rest_bridge.tool_parsers.base import (
    MarkerToolStream,
    NamedFunctionStream,
    RegionParser,
    StreamPiece,
    ToolCallStream,
    extract,
    merge_pieces,
)
from rest_bridge.tool_parsers.hermes import HermesParser
from rest_bridge.tool_parsers.json_calls import Llama3JsonParser, MistralParser, RequiredParser

TOOL_PARSERS: dict[str, Callable[[], RegionParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}

__all__ = [
    "TOOL_PARSERS",
    "MarkerToolStream",
    "NamedFunctionStream",
    "RequiredParser",
    "StreamPiece",
    "ToolCallStream",
    "extract",
    "merge_pieces",
]
