"""gpt-oss harmony channels on the format guide's own example outputs: analysis is reasoning,
final is content, a `to=functions.*` message is a call; whole and in random chunkings alike.
A constraint is refused with it (its reasoning end is several tokens)."""
from __future__ import annotations

import random

import pytest

from engine.output_parsing import OutputPiece, resolve_plan

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
ANSWER = ('<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. '
          "Provide answer.<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4.")
CALL = ("<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>"
        "assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"location":"San Francisco"}')
# The recipient may also sit in the role part of the header.
CALL_IN_ROLE = ('<|channel|>analysis<|message|>Two cities.<|end|><|start|>assistant '
                'to=functions.get_weather<|channel|>commentary json<|message|>{"location":"Oslo"}'
                '<|call|>')

CASES = [
    (ANSWER, [], 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.', "2 + 2 = 4.",
     []),
    (ANSWER + "<|return|>", [], 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.',
     "2 + 2 = 4.", []),
    (CALL, WEATHER, "Need to use function get_weather.", "",
     [("get_weather", '{"location": "San Francisco"}')]),
    (CALL_IN_ROLE, WEATHER, "Two cities.", "", [("get_weather", '{"location": "Oslo"}')]),
    # Without tools a call message is content, as written.
    (CALL, [], "Need to use function get_weather.", '{"location":"San Francisco"}', []),
    ("Plain text, no channels.", [], "", "Plain text, no channels.", []),
]


def _parse(text: str, tools: list, chunks: list[str], parallel: bool = True) -> tuple:
    plan = resolve_plan(reasoning_parser="gpt_oss", tool_parser="", tool_choice=None,
                        tools=tools, parallel_tool_calls=parallel)
    choice = plan.new_choice("<|start|>assistant")
    total = OutputPiece()
    for chunk in chunks:
        total.extend(choice.feed(chunk))
    total.extend(choice.finish())
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in total.tool_calls]
    assert choice.found_calls == bool(calls)
    return total.reasoning, total.content, calls


@pytest.mark.parametrize(("text", "tools", "reasoning", "content", "calls"), CASES)
def test_channels_whole_and_streamed(text, tools, reasoning, content, calls) -> None:
    expected = (reasoning, content, calls)
    assert _parse(text, tools, [text]) == expected
    for cut in range(len(text) + 1):
        assert _parse(text, tools, [text[:cut], text[cut:]]) == expected, cut
    rng = random.Random(text)
    for _ in range(20):
        chunks, start = [], 0
        while start < len(text):
            end = start + rng.randint(0, 8)
            chunks.append(text[start:end])
            start = end
        assert _parse(text, tools, chunks) == expected


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    two = CALL + "<|call|><|start|>assistant<|channel|>commentary to=functions.get_weather" \
        '<|message|>{"location":"Oslo"}<|call|>'
    assert len(_parse(two, WEATHER, [two])[2]) == 2
    assert _parse(two, WEATHER, [two], parallel=False)[2] == [
        ("get_weather", '{"location": "San Francisco"}')]


def test_a_constraint_cannot_wait_for_harmony_reasoning() -> None:
    from engine.errors import InvalidRequestError
    from engine.generation import GenerationRequest, PromptInput
    from engine.server.parsed_output import with_parsing
    from engine.structured.constraint import OutputConstraint
    from protoserve.v1 import inference_pb2

    from model_factory import make_tiny_tokenizer

    from engine.tokenizer import Tokenizer

    plan = resolve_plan(reasoning_parser="gpt_oss", tool_parser="", tool_choice=None, tools=[])
    generation = GenerationRequest("r", PromptInput(text="x"),
                                   constraint=OutputConstraint(json_object=True))
    tokenizer = Tokenizer(make_tiny_tokenizer(), model_templates={}, server_template=None)
    with pytest.raises(InvalidRequestError) as raised:
        with_parsing(generation, inference_pb2.GenerateRequest(), plan, tokenizer)
    assert raised.value.field == "parsing.reasoning_parser"
