"""Reading reasoning and tool calls out of generated text, on the engine's serving side, so
the gRPC stream carries them as typed events (no client re-parses text). No torch here."""
from engine.output_parsing.choice_parser import ChoiceOutputParser, OutputPiece
from engine.output_parsing.plan import HARMONY, OutputParsingPlan, resolve_plan
from engine.output_parsing.reasoning import REASONING_FORMATS, ReasoningFormat, ReasoningStream
from engine.output_parsing.tool_parsers import TOOL_PARSERS, register_tool_parser

# Every --reasoning-parser name: the marker formats and gpt-oss's harmony channels.
REASONING_PARSERS: tuple[str, ...] = (*sorted(REASONING_FORMATS), HARMONY)

__all__ = [
    "REASONING_FORMATS",
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "ChoiceOutputParser",
    "OutputParsingPlan",
    "OutputPiece",
    "ReasoningFormat",
    "ReasoningStream",
    "register_tool_parser",
    "resolve_plan",
]
