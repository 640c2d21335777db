"""tools + tool_choice -> what the engine is asked for and how its output is read back.

- "none": the template never sees the tools; output is plain content.
- "auto" (also implied by tools without tool_choice): the tools go to the template and the
  configured `--tool-call-parser` reads calls out of the text. An explicit "auto" without
  `--enable-auto-tool-choice` is a 400; an implied one just leaves the text unparsed.
- a named function: the output is held to the JSON schema of its parameters (a json_schema
  constraint) and returned as that function's call, finish_reason staying "stop".
- "required": the output is held to a JSON list of `{"name", "parameters"}` of the given tools
  and returned as calls.
The last two need the engine's guided decoding; an engine without it answers 400.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protoserve.v1 import common_pb2
from rest_bridge.chat_options import ChatOptions
from rest_bridge.errors import invalid_request
from rest_bridge.openai_schemas.chat import ChatCompletionRequest, NamedToolChoice, ToolParam
from rest_bridge.tool_parsers import (
    TOOL_PARSERS,
    MarkerToolStream,
    NamedFunctionStream,
    RequiredParser,
    ToolCallStream,
)

logger = logging.getLogger(__name__)

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    send_tools: bool = False
    # The constraint enforcing a named or required tool choice.
    constraint: common_pb2.OutputConstraint | None = None
    # One stream per choice reads tool calls out of its text; None: plain content.
    new_stream: Callable[[], ToolCallStream] | None = None
    # finish_reason "tool_calls" when calls were found (not for a named function).
    calls_finish_reason: bool = False
    # The parser's marker is a special token that detokenization must keep.
    keep_special_tokens: bool = False


def tool_plan_from(body: ChatCompletionRequest, options: ChatOptions) -> ToolPlan:
    if body.parallel_tool_calls is not None or body.user is not None:
        # Accepted for compatibility; calls are parsed from one sequence whatever is asked.
        logger.debug("ignoring parallel_tool_calls=%r user=%r",
                     body.parallel_tool_calls, body.user)
    tools = body.tools or []
    choice = body.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise invalid_request("tool_choice needs a non-empty tools list", param="tool_choice")
        return ToolPlan()
    if choice == "none":
        return ToolPlan()
    if isinstance(choice, NamedToolChoice):
        tool = _find_tool(tools, choice.function.name)
        schema = tool.function.parameters or _ANY_OBJECT
        name = tool.function.name
        return ToolPlan(
            send_tools=True,
            constraint=common_pb2.OutputConstraint(json_schema=json.dumps(schema)),
            new_stream=lambda: NamedFunctionStream(name),
        )
    if choice == "required":
        return ToolPlan(
            send_tools=True,
            constraint=common_pb2.OutputConstraint(json_schema=json.dumps(required_schema(tools))),
            new_stream=lambda: MarkerToolStream(RequiredParser()),
            calls_finish_reason=True,
        )
    parser_name = options.auto_tool_parser
    if parser_name is None:
        if choice == "auto":
            raise invalid_request(
                '"auto" tool choice needs the server started with --enable-auto-tool-choice '
                "and --tool-call-parser", param="tool_choice")
        return ToolPlan(send_tools=True)
    make_parser = TOOL_PARSERS[parser_name]
    return ToolPlan(
        send_tools=True,
        new_stream=lambda: MarkerToolStream(make_parser()),
        calls_finish_reason=True,
        keep_special_tokens=parser_name == "mistral",
    )


def required_schema(tools: list[ToolParam]) -> dict[str, Any]:
    """A non-empty JSON list of calls, each naming one of `tools` with valid parameters."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.function.name]},
                "parameters": tool.function.parameters or _ANY_OBJECT,
            },
            "required": ["name", "parameters"],
            # Without this the list item could grow extra keys, i.e. unbounded free text.
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def _find_tool(tools: list[ToolParam], name: str) -> ToolParam:
    for tool in tools:
        if tool.function.name == name:
            return tool
    raise invalid_request(
        f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
