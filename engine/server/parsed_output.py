"""A Generate request's output read by its parsers (engine.output_parsing) into the typed
`parsed` fields of its deltas, so a gRPC client never re-parses text.

    Started   the rendered prompt tells each choice's reasoning parser where it starts
    Delta     parsed = what the delta's text adds (reasoning / content / tool-call deltas);
              on the delta marked last, also what the parsers still held
    Finished  a choice ended without a last delta (abort, deadline) first gets a delta with
              no tokens carrying the held text; a choice whose calls were read ends with
              FINISH_REASON_TOOL_CALLS instead of STOP

The request side lives here too: which plan a request gets (its own `parsing`, else the
server's flags for chat input), detokenization that keeps special-token markers, and the
reasoning gate its constraint carries.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from engine.errors import InvalidRequestError
from engine.generation import (
    GenerationDelta,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    GenerationStarted,
)
from engine.output_parsing import OutputParsingPlan, OutputPiece, resolve_plan
from engine.output_parsing.choice_parser import ChoiceParser
from engine.structured.constraint import ReasoningGate
from protoserve.v1 import inference_pb2

if TYPE_CHECKING:
    from engine.server.request_tracker import ServingOptions
    from engine.tokenizer import Tokenizer


def parsing_plan_of(
    request: inference_pb2.GenerateRequest, options: ServingOptions
) -> OutputParsingPlan | None:
    """The request's own `parsing`, else for chat input the server's --reasoning-parser and
    (with --enable-auto-tool-choice) --tool-call-parser; None when nothing is parsed."""
    is_chat = request.WhichOneof("input") == "chat"
    if request.HasField("return_text") and not request.return_text:
        # No text, nothing to read: only a request that asked for parsing is told so.
        if request.HasField("parsing"):
            raise InvalidRequestError("parsing reads the output text: it needs return_text "
                                      "true", field="return_text")
        return None
    if request.HasField("parsing"):
        parsing = request.parsing
        reasoning, tools_parser = parsing.reasoning_parser, parsing.tool_parser
        parallel = parsing.parallel_tool_calls if parsing.HasField("parallel_tool_calls") else True
    elif is_chat:
        reasoning, tools_parser = options.reasoning_parser, options.auto_tool_parser
        parallel = True
    else:
        return None
    chat = request.chat
    tools: list[dict[str, Any]] = (
        [json_format.MessageToDict(tool) for tool in chat.tools] if is_chat else [])
    tool_choice = chat.tool_choice if is_chat and chat.HasField("tool_choice") else None
    return resolve_plan(reasoning_parser=reasoning, tool_parser=tools_parser,
                        tool_choice=tool_choice, tools=tools, parallel_tool_calls=parallel)


def single_token_id(tokenizer: Tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def with_parsing(
    generation: GenerationRequest,
    request: inference_pb2.GenerateRequest,
    plan: OutputParsingPlan,
    tokenizer: Tokenizer,
) -> GenerationRequest:
    """The request as its parsers need it: marker tokens kept in the text when they are
    special tokens (unless the client chose), and its constraint gated behind the
    reasoning."""
    markers = list(plan.markers)
    special = tokenizer.all_special_ids
    if not request.sampling.HasField("skip_special_tokens") and any(
        single_token_id(tokenizer, marker) in special for marker in markers
    ):
        params = replace(generation.sampling_params, skip_special_tokens=False)
        if not request.sampling.HasField("spaces_between_special_tokens"):
            params = replace(params, spaces_between_special_tokens=False)
        generation = replace(generation, sampling_params=params)
    if plan.harmony and generation.constraint is not None:
        raise InvalidRequestError(
            "reasoning parser 'gpt_oss': harmony's reasoning ends in several tokens, so a "
            "constraint (guided decoding, response_format, a named or required tool_choice) "
            "cannot wait for it", field="parsing.reasoning_parser")
    if plan.reasoning is not None and generation.constraint is not None:
        end_id = single_token_id(tokenizer, plan.reasoning.end)
        if end_id is None:
            raise InvalidRequestError(
                f"reasoning parser {plan.reasoning.name!r}: {plan.reasoning.end!r} is not one "
                "token of this model's tokenizer, so the constraint cannot wait for it",
                field="parsing.reasoning_parser")
        gate = ReasoningGate(end_id, single_token_id(tokenizer, plan.reasoning.start),
                             plan.reasoning.implicit_start)
        generation = replace(generation, constraint=replace(generation.constraint, reasoning=gate))
    return generation


class ParsedOutputWriter:
    """Per request: turns engine events into GenerateResponses with `parsed` filled."""

    def __init__(self, plan: OutputParsingPlan) -> None:
        self._plan = plan
        self._prompt_text: str | None = None
        self._choices: dict[int, ChoiceParser] = {}
        self._flushed: set[int] = set()

    def responses(
        self, event: GenerationEvent, response: inference_pb2.GenerateResponse
    ) -> list[inference_pb2.GenerateResponse]:
        if isinstance(event, GenerationStarted):
            self._prompt_text = event.prompt_text
            return [response]
        if isinstance(event, GenerationDelta):
            choice = self._choice(event.index)
            piece = choice.feed(event.text)
            if event.last:
                piece.extend(choice.finish())
                self._flushed.add(event.index)
            _fill(response.delta.parsed, piece)
            return [response]
        assert isinstance(event, GenerationFinished)
        out = []
        choice = self._choice(event.index)
        if event.index not in self._flushed:
            self._flushed.add(event.index)
            rest = choice.finish()
            if rest:
                flush = inference_pb2.GenerateResponse(
                    delta=inference_pb2.GenerateDelta(index=event.index))
                _fill(flush.delta.parsed, rest)
                out.append(flush)
        if (self._plan.calls_finish_reason and choice.found_calls
                and response.finished.reason == inference_pb2.FINISH_REASON_STOP):
            response.finished.reason = inference_pb2.FINISH_REASON_TOOL_CALLS
        out.append(response)
        return out

    def _choice(self, index: int) -> ChoiceParser:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = self._plan.new_choice(self._prompt_text)
        return choice


def _fill(parsed: inference_pb2.ParsedOutput, piece: OutputPiece) -> None:
    parsed.reasoning = piece.reasoning
    parsed.content = piece.content
    for call in piece.tool_calls:
        function = call.get("function", {})
        parsed.tool_calls.add(index=call["index"], id=call.get("id", ""),
                              name=function.get("name", ""),
                              arguments=function.get("arguments", ""))
