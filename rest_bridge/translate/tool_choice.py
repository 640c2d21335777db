"""tools + tool_choice -> what the engine is asked for: the constraint and the parsers.

The engine reads reasoning and tool calls out of the output (engine.output_parsing) and
streams them as typed `parsed` fields; the bridge only names the parsers (its
--reasoning-parser and --tool-call-parser) in the request's `parsing` and turns the parsed
fields into OpenAI JSON (translate/parsed_output.py).

- "none": the template never sees the tools; output is plain content.
- "auto" (also implied by tools without tool_choice): the tools go to the template and the
  configured `--tool-call-parser` reads calls out of the text. An explicit "auto" without
  `--enable-auto-tool-choice` is a 400; an implied one just leaves the text unparsed.
- a named function: the output is held to the JSON schema of its parameters (a json_schema
  constraint) and returned as that function's call, finish_reason staying "stop".
- "required": the output is held to a JSON list of `{"name", "parameters"}` of the given tools
  and returned as calls.
The last two need the engine's guided decoding; an engine without it answers 400. The
engine learns the choice from the chat input's tool_choice; with a reasoning parser the
constraint starts only once the reasoning has ended.
`parallel_tool_calls: false` keeps at most one call.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.chat_options import ChatOptions
from rest_bridge.errors import invalid_request
from rest_bridge.openai_schemas.chat import ChatCompletionRequest, NamedToolChoice, ToolParam

logger = logging.getLogger(__name__)

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    send_tools: bool = False
    # The constraint enforcing a named or required tool choice.
    constraint: common_pb2.OutputConstraint | None = None
    # The parsers the engine runs over the output; None: plain text.
    parsing: inference_pb2.OutputParsing | None = None


def tool_plan_from(body: ChatCompletionRequest, options: ChatOptions) -> ToolPlan:
    """Always names the parsers (none included), so the engine's own defaults for gRPC chat
    clients never apply to the bridge's requests: the bridge's flags decide."""
    plan = _tool_plan(body, options)
    tool_parser = (options.auto_tool_parser or "") if plan.send_tools else ""
    parsing = inference_pb2.OutputParsing(
        reasoning_parser=options.reasoning_parser or "", tool_parser=tool_parser)
    if body.parallel_tool_calls is not None:
        parsing.parallel_tool_calls = body.parallel_tool_calls
    return ToolPlan(send_tools=plan.send_tools, constraint=plan.constraint, parsing=parsing)


def _tool_plan(body: ChatCompletionRequest, options: ChatOptions) -> ToolPlan:
    if body.user is not None:
        logger.debug("ignoring user=%r", body.user)
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
        return ToolPlan(
            send_tools=True,
            constraint=common_pb2.OutputConstraint(json_schema=json.dumps(schema)),
        )
    if choice == "required":
        return ToolPlan(
            send_tools=True,
            constraint=common_pb2.OutputConstraint(json_schema=json.dumps(required_schema(tools))),
        )
    parser_name = options.auto_tool_parser
    if parser_name is None:
        if choice == "auto":
            raise invalid_request(
                '"auto" tool choice needs the server started with --enable-auto-tool-choice '
                "and --tool-call-parser", param="tool_choice")
    return ToolPlan(send_tools=True)


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
