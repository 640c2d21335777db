"""Chat template rendering against transformers' apply_chat_template, errors and the sandbox."""
from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from model_factory import save_tiny_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.errors import InvalidRequestError
from engine.tokenizer import Tokenizer

EXAMPLE_TEMPLATES = Path(__file__).resolve().parents[3] / "examples" / "chat_templates"

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Why is the sky blue?\n"},
        {"role": "assistant", "content": "Rayleigh scattering."},
        {"role": "user", "content": "Und auf Deutsch? Καλημέρα, 今日は 🙂"},
    ],
    [
        {"role": "user", "content": "Line one\nLine two"},
        {"role": "assistant", "content": "Noted.", "tool_calls": None},
        {"role": "user", "content": ""},
    ],
]
CONTINUED: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there \n"}],
]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def template_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Tokenizer, PreTrainedTokenizerBase]:
    template = (EXAMPLE_TEMPLATES / f"{request.param}.jinja").read_text(encoding="utf-8")
    directory = save_tiny_tokenizer(tmp_path_factory.mktemp(request.param), chat_template=template)
    return Tokenizer.load(str(directory)), AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def chatml_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Tokenizer, PreTrainedTokenizerBase]:
    directory = save_tiny_tokenizer(tmp_path_factory.mktemp("chatml-default"))
    return Tokenizer.load(str(directory)), AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["single", "multi", "newlines"])
def test_render_matches_transformers(
    template_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool,
) -> None:
    tokenizer, reference = template_pair
    expected = reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    rendered = tokenizer.render_chat(conversation, add_generation_prompt=add_generation_prompt)
    assert rendered == expected


@pytest.mark.parametrize("conversation", CONTINUED, ids=["plain", "trailing-space"])
def test_continue_final_message_matches_transformers(
    template_pair: tuple[Tokenizer, PreTrainedTokenizerBase], conversation: list[dict[str, Any]]
) -> None:
    tokenizer, reference = template_pair
    expected = reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    rendered = tokenizer.render_chat(
        conversation, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered == expected
    assert rendered.rstrip().endswith(conversation[-1]["content"].strip())


def test_list_of_text_parts_renders_like_the_joined_string(
    template_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, _ = template_pair
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second 🙂"}]
    as_parts = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": parts}]
    as_text = [as_parts[0], {"role": "user", "content": "First part.\nSecond 🙂"}]
    assert tokenizer.render_chat(as_parts) == tokenizer.render_chat(as_text)


def test_non_text_part_is_rejected(chatml_pair: tuple[Tokenizer, PreTrainedTokenizerBase]) -> None:
    tokenizer, _ = chatml_pair
    image = {"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}
    with pytest.raises(InvalidRequestError) as raised:
        tokenizer.render_chat([{"role": "user", "content": [image]}])
    assert raised.value.field == "messages" and "image_url" in raised.value.message


FEATURE_TEMPLATES = {
    "tojson": "{% if tools %}{{ tools | tojson(indent=2) }}\n{% endif %}"
    "{% for m in messages %}{{ m | tojson }}\n{% endfor %}",
    "namespace": "{% set ns = namespace(system=false) %}{% for m in messages %}"
    "{% if m.role == 'system' %}{% set ns.system = true %}{% endif %}{% endfor %}{{ ns.system }}",
    "loopcontrols": "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
    "{{ m.content }}{% endfor %}",
    "dict": "{% set d = dict(a=1, b=messages|length) %}{{ d.b }}-{{ d.a }}",
    "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}",
    "kwargs": "{{ greeting }} {{ bos_token }} {{ eos_token }} {{ documents | length }}",
}


@pytest.mark.parametrize("name", sorted(FEATURE_TEMPLATES))
def test_template_helpers_match_transformers(
    chatml_pair: tuple[Tokenizer, PreTrainedTokenizerBase], name: str
) -> None:
    tokenizer, reference = chatml_pair
    conversation = [
        {"role": "system", "content": "Quote <b> & \"é\" 🙂"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    documents = [{"title": "Doc", "text": "Body"}]
    kwargs = {"greeting": "Salut", "eos_token": "<EOS-OVERRIDE>"}
    template = FEATURE_TEMPLATES[name]
    expected = reference.apply_chat_template(
        conversation, tools=tools, documents=documents, chat_template=template,
        tokenize=False, add_generation_prompt=False, **kwargs,
    )
    rendered = tokenizer.render_chat(
        conversation, tools=tools, documents=documents, chat_template=template,
        chat_template_kwargs=kwargs, add_generation_prompt=False,
    )
    assert rendered == expected


def test_strftime_now_renders_today(
    chatml_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, _ = chatml_pair
    before = date.today()
    rendered = tokenizer.render_chat(
        [{"role": "user", "content": "x"}], chat_template="{{ strftime_now('%Y-%m-%d') }}"
    )
    assert rendered in {before.isoformat(), (before + timedelta(days=1)).isoformat()}


def test_missing_template_is_an_invalid_request(tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(str(save_tiny_tokenizer(tmp_path, chat_template=None)))
    assert not tokenizer.has_chat_template
    with pytest.raises(InvalidRequestError) as raised:
        tokenizer.render_chat([{"role": "user", "content": "Hello"}])
    assert raised.value.field == "messages"
    assert "no chat template" in raised.value.message
    assert "--chat-template" in raised.value.message


def test_continue_with_generation_prompt_is_rejected(
    chatml_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, _ = chatml_pair
    with pytest.raises(InvalidRequestError) as raised:
        tokenizer.render_chat(
            CONTINUED[0], add_generation_prompt=True, continue_final_message=True
        )
    assert raised.value.field == "continue_final_message"
    assert "continue_final_message" in raised.value.message


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
         "Conversation roles must alternate user/assistant"),
        ("{{ undefined_thing.attribute }}", "undefined_thing"),
        ("{% for m in messages %}{{ m.content }}", "endfor"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
    ],
    ids=["raise_exception", "undefined", "syntax", "type-error"],
)
def test_template_errors_are_invalid_requests(
    chatml_pair: tuple[Tokenizer, PreTrainedTokenizerBase], template: str, fragment: str
) -> None:
    tokenizer, _ = chatml_pair
    with pytest.raises(InvalidRequestError) as raised:
        tokenizer.render_chat([{"role": "user", "content": "Hello"}], chat_template=template)
    assert fragment in raised.value.message


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ (messages|first).items.__self__ }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}{{ ns }}",
        "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    ],
)
def test_sandbox_blocks_escapes(
    chatml_pair: tuple[Tokenizer, PreTrainedTokenizerBase], template: str
) -> None:
    tokenizer, _ = chatml_pair
    with pytest.raises(InvalidRequestError):
        tokenizer.render_chat([{"role": "user", "content": "Hello"}], chat_template=template)


def test_reserved_template_kwargs_are_rejected(
    chatml_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, _ = chatml_pair
    with pytest.raises(InvalidRequestError) as raised:
        tokenizer.render_chat(
            [{"role": "user", "content": "Hello"}], chat_template_kwargs={"messages": []}
        )
    assert raised.value.field == "chat_template_kwargs"


def test_rendering_does_not_modify_the_callers_messages(
    chatml_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, _ = chatml_pair
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hel"},
    ]
    snapshot = [dict(message) for message in conversation]
    tokenizer.render_chat(conversation, add_generation_prompt=False, continue_final_message=True)
    assert conversation == snapshot
