"""What a request asks to be read out of its output, resolved once per request.

    reasoning_parser  a REASONING_FORMATS name, "gpt_oss" (harmony channels: reasoning,
                      content and function calls all come from the channel structure), or ""
    tool_parser       a TOOL_PARSERS name, used when tool_choice is "auto" (or unset) and the
                      request has tools; "" for none
    tool_choice       "none" | "auto" | "required" | a function name (the chat input's)
    parallel_tool_calls  False: at most one call is returned

tool_choice "required" reads the JSON list the required-calls schema holds the output to; a
function name reads the whole output as that function's arguments (also schema-held).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from engine.output_parsing.choice_parser import ChoiceOutputParser, ChoiceParser
from engine.output_parsing.harmony import MARKERS as HARMONY_MARKERS
from engine.output_parsing.harmony import HarmonyChoiceParser
from engine.output_parsing.reasoning import REASONING_FORMATS, ReasoningFormat, ReasoningStream
from engine.output_parsing.tool_parsers import (
    TOOL_PARSERS,
    MarkerToolStream,
    NamedFunctionStream,
    RequiredParser,
    ToolCallStream,
    ToolParser,
)

_CHOICE_KEYWORDS = ("none", "auto", "required")
HARMONY = "gpt_oss"


@dataclass(frozen=True, slots=True)
class OutputParsingPlan:
    reasoning: ReasoningFormat | None = None
    tool_parser: type[ToolParser] | None = None
    # tool_choice names this function: the whole output is its arguments.
    function_name: str | None = None
    tools: tuple[dict[str, Any], ...] = ()
    max_calls: int | None = None
    # gpt-oss harmony channels (engine.output_parsing.harmony) instead of the two above.
    harmony: bool = False
    # harmony: read `to=functions.*` messages as calls (the request has tools, choice auto).
    harmony_calls: bool = False

    @property
    def parses_tools(self) -> bool:
        return self.tool_parser is not None or self.function_name is not None

    @property
    def calls_finish_reason(self) -> bool:
        """Found calls end the choice with finish reason TOOL_CALLS (not a named function's,
        whose call was asked for by name and ends as STOP, as on the reference server)."""
        return self.tool_parser is not None or self.harmony_calls

    @property
    def markers(self) -> tuple[str, ...]:
        """Every marker text the parsers look for (reasoning and tool-call region starts)."""
        found: tuple[str, ...] = HARMONY_MARKERS if self.harmony else ()
        if self.reasoning is not None:
            found += (self.reasoning.start, self.reasoning.end)
        if self.tool_parser is not None:
            found += tuple(self.tool_parser.markers)
        return found

    def new_choice(self, prompt_text: str | None) -> ChoiceParser:
        if self.harmony:
            return HarmonyChoiceParser(self.harmony_calls, self.max_calls)
        reasoning = ReasoningStream(self.reasoning, prompt_text) if self.reasoning else None
        tools: ToolCallStream | None = None
        if self.function_name is not None:
            tools = NamedFunctionStream(self.function_name)
        elif self.tool_parser is not None:
            tools = MarkerToolStream(self.tool_parser(self.tools), max_calls=self.max_calls)
        return ChoiceOutputParser(reasoning, tools)


def resolve_plan(
    *,
    reasoning_parser: str,
    tool_parser: str,
    tool_choice: str | None,
    tools: Sequence[dict[str, Any]],
    parallel_tool_calls: bool = True,
    field_prefix: str = "parsing",
) -> OutputParsingPlan | None:
    """The plan, or None when nothing is to be parsed. Raises InvalidRequestError naming the
    field for an unknown parser name."""
    reasoning = None
    harmony = reasoning_parser == HARMONY
    if reasoning_parser and not harmony:
        reasoning = REASONING_FORMATS.get(reasoning_parser)
        if reasoning is None:
            names = ", ".join(sorted([*REASONING_FORMATS, HARMONY]))
            raise InvalidRequestError(
                f"unknown reasoning parser {reasoning_parser!r} (one of {names})",
                field=f"{field_prefix}.reasoning_parser")
    parser_class = None
    if tool_parser:
        parser_class = TOOL_PARSERS.get(tool_parser)
        if parser_class is None:
            names = ", ".join(sorted(TOOL_PARSERS))
            raise InvalidRequestError(
                f"unknown tool parser {tool_parser!r} (one of {names})",
                field=f"{field_prefix}.tool_parser")
    choice = tool_choice or "auto"
    if harmony:
        # The channel structure is the tool syntax: no separate tool parser.
        return OutputParsingPlan(harmony=True, harmony_calls=bool(tools) and choice == "auto",
                                 max_calls=None if parallel_tool_calls else 1)
    function_name = None
    if not tools or choice == "none":
        parser_class = None
    elif choice == "required":
        parser_class = RequiredParser
    elif choice not in _CHOICE_KEYWORDS:
        parser_class, function_name = None, choice
    if reasoning is None and parser_class is None and function_name is None:
        return None
    return OutputParsingPlan(
        reasoning=reasoning,
        tool_parser=parser_class,
        function_name=function_name,
        tools=tuple(tools),
        max_calls=None if parallel_tool_calls else 1,
    )
