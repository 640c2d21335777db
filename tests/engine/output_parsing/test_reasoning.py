"""Reasoning parsers on each format's documented output, whole and in random chunkings, and
reasoning followed by tool calls (calls are only read after the reasoning)."""
from __future__ import annotations

import random

import pytest

from engine.errors import InvalidRequestError
from engine.output_parsing import OutputPiece, resolve_plan
from engine.output_parsing.reasoning import REASONING_FORMATS, ReasoningState, ReasoningStream
from engine.output_parsing.tool_parsers import StreamPiece, merge_pieces

QWEN3_THINKING_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
QWEN3_NO_THINKING_PROMPT = QWEN3_THINKING_PROMPT + "<think>\n\n</think>\n\n"
R1_PROMPT = "<｜User｜>hi<｜Assistant｜><think>\n"

# (parser, rendered prompt, model output, reasoning, content)
CASES = [
    ("deepseek_r1", R1_PROMPT, "Let me think.\n</think>\n\nParis.", "Let me think.\n", "\n\nParis."),
    # The older R1 template leaves <think> to the model: dropped at the block's start.
    ("deepseek_r1", "<｜Assistant｜>", "<think>hmm</think>Paris.", "hmm", "Paris."),
    # No end marker: all reasoning (cut short by max_tokens).
    ("deepseek_r1", R1_PROMPT, "still thinking about <thi", "still thinking about <thi", ""),
    ("qwen3", QWEN3_THINKING_PROMPT, "<think>\nThe user greets.\n</think>\n\nHello!",
     "\nThe user greets.\n", "\n\nHello!"),
    # enable_thinking false: the template closed an empty block; output is all content.
    ("qwen3", QWEN3_NO_THINKING_PROMPT, "Hello! <think> is a tag.", "", "Hello! <think> is a tag."),
    # A model that does not open a block answers in content.
    ("qwen3", QWEN3_THINKING_PROMPT, "Hello!", "", "Hello!"),
    ("qwen3", QWEN3_THINKING_PROMPT, "<thi", "", "<thi"),
    ("mistral", "[INST]hi[/INST]", "[THINK]Greeting.[/THINK]Hello!", "Greeting.", "Hello!"),
    ("mistral", "[INST]hi[/INST]", "Hello [THINK] not at start", "", "Hello [THINK] not at start"),
]


def _run(parser: str, prompt: str, chunks: list[str]) -> tuple[str, str]:
    stream = ReasoningStream(REASONING_FORMATS[parser], prompt)
    pieces = [stream.feed(chunk) for chunk in chunks] + [stream.finish()]
    return "".join(p.reasoning for p in pieces), "".join(p.content for p in pieces)


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, start = [], 0
    while start < len(text):
        end = start + rng.randint(0, 6)
        chunks.append(text[start:end])
        start = end
    return chunks


@pytest.mark.parametrize(("parser", "prompt", "text", "reasoning", "content"), CASES)
def test_reasoning_split_whole_and_streamed(
    parser: str, prompt: str, text: str, reasoning: str, content: str
) -> None:
    assert _run(parser, prompt, [text]) == (reasoning, content)
    for cut in range(len(text) + 1):
        assert _run(parser, prompt, [text[:cut], text[cut:]]) == (reasoning, content), cut
    rng = random.Random(text)
    for _ in range(20):
        assert _run(parser, prompt, _random_chunks(text, rng)) == (reasoning, content)


def test_the_prompt_decides_where_the_output_starts() -> None:
    qwen3 = REASONING_FORMATS["qwen3"]
    assert qwen3.initial_state(QWEN3_NO_THINKING_PROMPT) is ReasoningState.ENDED
    assert qwen3.initial_state(QWEN3_THINKING_PROMPT) is ReasoningState.UNDECIDED
    assert REASONING_FORMATS["deepseek_r1"].initial_state(R1_PROMPT) is ReasoningState.REASONING


HERMES_TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def _parse_all(plan, prompt: str, chunks: list[str]) -> OutputPiece:
    choice = plan.new_choice(prompt)
    total = OutputPiece()
    for chunk in chunks:
        total.extend(choice.feed(chunk))
    total.extend(choice.finish())
    # Calls as a client assembles them from their deltas (name first, arguments in pieces).
    _, total.tool_calls = merge_pieces([StreamPiece(tool_calls=total.tool_calls)])
    for call in total.tool_calls:
        call.pop("id", None)
    return total


def test_tool_calls_are_read_only_after_the_reasoning() -> None:
    plan = resolve_plan(reasoning_parser="qwen3", tool_parser="hermes", tool_choice="auto",
                        tools=HERMES_TOOLS)
    text = ('<think>maybe <tool_call>{"name": "x", "arguments": {}}</tool_call>?</think>'
            '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>')
    whole = _parse_all(plan, QWEN3_THINKING_PROMPT, [text])
    assert whole.reasoning == 'maybe <tool_call>{"name": "x", "arguments": {}}</tool_call>?'
    assert whole.content == ""
    assert [c["function"] for c in whole.tool_calls] == [
        {"name": "weather", "arguments": '{"city": "Paris"}'}]
    rng = random.Random(0)
    for _ in range(20):
        assert _parse_all(plan, QWEN3_THINKING_PROMPT, _random_chunks(text, rng)) == whole


def test_unknown_parser_names_the_field() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        resolve_plan(reasoning_parser="nope", tool_parser="", tool_choice=None, tools=[])
    assert raised.value.field == "parsing.reasoning_parser"
    with pytest.raises(InvalidRequestError) as raised:
        resolve_plan(reasoning_parser="", tool_parser="nope", tool_choice=None, tools=[])
    assert raised.value.field == "parsing.tool_parser"


def test_tool_choice_decides_the_tool_reading() -> None:
    assert resolve_plan(reasoning_parser="", tool_parser="hermes", tool_choice="none",
                        tools=HERMES_TOOLS) is None
    assert resolve_plan(reasoning_parser="", tool_parser="hermes", tool_choice=None,
                        tools=[]) is None
    named = resolve_plan(reasoning_parser="", tool_parser="", tool_choice="weather",
                         tools=HERMES_TOOLS)
    assert named is not None and named.function_name == "weather"
    assert not named.calls_finish_reason
    required = resolve_plan(reasoning_parser="", tool_parser="", tool_choice="required",
                            tools=HERMES_TOOLS, parallel_tool_calls=False)
    assert required is not None and required.calls_finish_reason and required.max_calls == 1
