"""Content formats, tools, documents and the example templates, against transformers'
`apply_chat_template`: whatever shape a client sends content in, our prompt equals what
transformers renders when handed content in the shape the template expects."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from model_factory import save_tiny_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.tokenizer import Tokenizer
from engine.tokenizer.content_format import detect_content_format, resolve_content_format

EXAMPLE_TEMPLATES = Path(__file__).resolve().parents[3] / "examples" / "chat_templates"
TEMPLATE_FORMATS = {
    "llama3": "string",
    "chatml": "string",
    "mistral": "string",
    "hermes_tool_use": "string",
    "openai_content": "openai",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
PARTS = [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second, 🙂"}]
DOCUMENTS = [{"title": "Sky", "text": "Rayleigh scattering."}, {"title": "Sea", "text": "Salt."}]


def _pair(template: str, tmp_path: Path) -> tuple[Tokenizer, PreTrainedTokenizerBase]:
    source = (EXAMPLE_TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    directory = save_tiny_tokenizer(tmp_path / template, chat_template=source)
    return Tokenizer.load(str(directory)), AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module", params=sorted(TEMPLATE_FORMATS))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Tokenizer, PreTrainedTokenizerBase]:
    tokenizer, reference = _pair(request.param, tmp_path_factory.mktemp("t"))
    return request.param, tokenizer, reference


def _as_template_expects(messages: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """The messages in the shape transformers must be given to render the same prompt."""
    shaped = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if fmt == "openai" and isinstance(content, str):
            message["content"] = [{"type": "text", "text": content}]
        elif fmt == "string" and isinstance(content, list):
            message["content"] = "\n".join(part["text"] for part in content)
        shaped.append(message)
    return shaped


@pytest.mark.parametrize("content", ["string", "parts"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_example_templates_match_transformers(
    pair: tuple[str, Tokenizer, PreTrainedTokenizerBase],
    content: str,
    add_generation_prompt: bool,
) -> None:
    name, tokenizer, reference = pair
    fmt = TEMPLATE_FORMATS[name]
    assert tokenizer.default_content_format() == fmt
    user_content: str | list[dict[str, str]] = PARTS if content == "parts" else "Hi there"
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Scattering."},
        {"role": "user", "content": user_content},
    ]
    expected = reference.apply_chat_template(
        _as_template_expects(messages, fmt),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("template", ["hermes_tool_use", "mistral"])
def test_tools_and_tool_call_turns_match_transformers(template: str, tmp_path: Path) -> None:
    tokenizer, reference = _pair(template, tmp_path)
    arguments = {"city": "Paris", "unit": "c"}
    call = {"id": "call0abc1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}
    turns: list[dict[str, Any]] = [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call0abc1", "content": '{"temp": 21}'},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    ]
    # Over the wire, arguments are JSON text; transformers' templates expect the object.
    wire = json.loads(json.dumps(turns))
    wire[2]["function_call_note"] = None  # None-valued keys are dropped before rendering
    wire[2]["tool_calls"][0]["function"]["arguments"] = json.dumps(arguments)
    reference_turns = _as_template_expects(turns, "string")
    del reference_turns[2]["content"]
    expected = reference.apply_chat_template(
        reference_turns, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.render_chat(wire, tools=[WEATHER_TOOL]) == expected
    assert '"city": "Paris"' in expected


def test_null_content_renders_empty_as_the_reference_server_does(tmp_path: Path) -> None:
    """ChatML reads `message['content']` unconditionally: an assistant turn of tool calls
    (content null) renders with empty content instead of failing the template."""
    tokenizer, reference = _pair("chatml", tmp_path)
    call = {"id": "call0abc1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "user", "content": "Thanks"},
    ]
    expected = reference.apply_chat_template(
        [turns[0], {"role": "assistant", "content": ""}, turns[2]], tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.render_chat(turns) == expected
    assert "<|im_start|>assistant\n<|im_end|>" in expected


def test_documents_custom_roles_and_names_match_transformers(tmp_path: Path) -> None:
    tokenizer, reference = _pair("openai_content", tmp_path)
    messages = [
        {"role": "user", "name": "ana", "content": PARTS},
        {"role": "critic", "content": "Too short."},
    ]
    expected = reference.apply_chat_template(
        _as_template_expects(messages, "openai"),
        documents=DOCUMENTS,
        tokenize=False,
        add_generation_prompt=True,
    )
    rendered = tokenizer.render_chat(messages, documents=DOCUMENTS)
    assert rendered == expected
    assert "[2] Sea: Salt." in rendered and "<|im_start|>user (ana)\nFirst line.\nSecond" in rendered


def test_continue_final_message_with_parts_content(tmp_path: Path) -> None:
    tokenizer, reference = _pair("openai_content", tmp_path)
    messages = [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": [{"type": "text", "text": "One, two,"}]},
    ]
    expected = reference.apply_chat_template(
        _as_template_expects(messages, "openai"),
        tokenize=False,
        add_generation_prompt=False,
        continue_final_message=True,
    )
    rendered = tokenizer.render_chat(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered == expected and rendered.endswith("One, two,")


DETECTION_CASES = {
    "direct loop": ("{% for m in messages %}{% for p in m['content'] %}{{ p.text }}"
                    "{% endfor %}{% endfor %}", "openai"),
    "attribute": ("{% for m in messages %}{% for p in m.content %}{% endfor %}{% endfor %}",
                  "openai"),
    "sliced alias": ("{% set rest = messages[1:] %}{% for m in rest %}"
                     "{% for p in m.content | list %}{% endfor %}{% endfor %}", "openai"),
    "filtered alias chain": ("{% set a = messages | selectattr('role') | list %}{% set b = a %}"
                             "{% for m in b %}{% for p in m['content'] %}{% endfor %}"
                             "{% endfor %}", "openai"),
    "content alias": ("{% for m in messages %}{% set c = m['content'] %}{% for p in c %}"
                      "{% endfor %}{% endfor %}", "openai"),
    "string use": ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
    "other loop": ("{% for m in messages %}{{ m.content }}{% endfor %}"
                   "{% for t in tools %}{% for x in t.content %}{% endfor %}{% endfor %}",
                   "string"),
    "broken": ("{% for m in messages %", "string"),
}


@pytest.mark.parametrize("case", sorted(DETECTION_CASES))
def test_content_format_detection(case: str) -> None:
    source, expected = DETECTION_CASES[case]
    assert detect_content_format(source) == expected


def test_explicit_content_format_overrides_detection() -> None:
    loop = DETECTION_CASES["direct loop"][0]
    assert resolve_content_format(loop, "string") == "string"
    assert resolve_content_format("{{ messages }}", "openai") == "openai"
    assert resolve_content_format(None, "auto") == "string"
    with pytest.raises(ValueError):
        resolve_content_format(loop, "list")


def test_detected_format_is_logged_once_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = (EXAMPLE_TEMPLATES / "openai_content.jinja").read_text(encoding="utf-8")
    directory = save_tiny_tokenizer(tmp_path / "tok", chat_template=source)
    with caplog.at_level(logging.INFO, logger="engine.tokenizer.tokenizer"):
        tokenizer = Tokenizer.load(str(directory))
        tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    lines = [r.getMessage() for r in caplog.records if "content format" in r.getMessage()]
    assert lines == [
        "Detected the chat template content format to be 'openai'. Set "
        "--chat-template-content-format to override."
    ]
    forced = Tokenizer.load(str(directory), content_format="string")
    assert forced.default_content_format() == "string"


def test_add_special_tokens_does_not_double_the_templates_bos(tmp_path: Path) -> None:
    tokenizer, reference = _pair("chatml", tmp_path)
    text = tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    bos = reference.bos_token_id
    assert text.startswith(reference.bos_token)
    # The tokenizer adds BOS on its own and the template wrote one: transformers doubles it.
    assert reference.encode(text, add_special_tokens=True)[:2] == [bos, bos]
    with_special = tokenizer.encode_chat(text, add_special_tokens=True)
    assert with_special == reference.encode(text, add_special_tokens=False)
    assert with_special.count(bos) == 1
    assert tokenizer.encode_chat(text, add_special_tokens=False) == with_special
