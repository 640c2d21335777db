"""Backend names and options as the reference server's clients send them, and what they do
to the matcher: bounded JSON whitespace by default, the whitespace options, closed objects,
and ASCII `\\d \\w \\s` in regexes (checked by feeding real token ids to real matchers)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.errors import InvalidRequestError
from engine.structured.backend_names import BackendChoice, apply_backend, resolve_backend
from engine.structured.constraint import ANY_JSON_WHITESPACE, OutputConstraint
from engine.structured.grammar import TokenizerInfo
from engine.structured.llguidance_backend import LLGuidanceBackend
from engine.structured.regex_classes import ascii_class_escapes

HAS_XGRAMMAR = importlib.util.find_spec("xgrammar") is not None
SERVER_DEFAULT = BackendChoice("auto", "llguidance", frozenset())


@pytest.fixture(scope="module")
def backend(tiny_llama_dir: Path) -> tuple[LLGuidanceBackend, object]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    info = TokenizerInfo(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    return LLGuidanceBackend(info), tokenizer


def _accepts(backend, constraint: OutputConstraint, text: str) -> bool:
    engine_backend, tokenizer = backend
    grammar = engine_backend.compile(constraint).new_grammar()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return grammar.accept_tokens(ids) and grammar.is_terminated


@pytest.mark.parametrize("name", ["auto", "outlines", "lm-format-enforcer", "guidance",
                                  "llguidance", "xgrammar", "XGrammar", " outlines "])
def test_every_reference_name_is_served(name: str) -> None:
    choice = resolve_backend(name)
    expected = "xgrammar" if name.strip().lower() == "xgrammar" and HAS_XGRAMMAR else "llguidance"
    assert choice.backend == expected and choice.options == frozenset()


def test_options_after_a_colon() -> None:
    choice = resolve_backend("xgrammar:disable-any-whitespace, disable-additional-properties")
    assert choice.options == {"disable-any-whitespace", "disable-additional-properties"}
    assert resolve_backend("guidance:no-fallback").options == {"no-fallback"}


@pytest.mark.parametrize("name, reason", [
    ("pydantic", "unknown guided decoding backend"),
    ("xgrammar:fast", "unknown guided decoding backend option"),
    ("auto:any-whitespace,disable-any-whitespace", "contradict"),
])
def test_bad_names_name_the_field(name: str, reason: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_backend(name)
    assert info.value.field == "constraint.backend" and reason in info.value.message


def test_apply_backend_resolves_and_sets_options() -> None:
    schema = json.dumps({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
        "c": {"type": ["object", "null"], "properties": {}, "additionalProperties": True}}})
    constraint = apply_backend(
        OutputConstraint(json_schema=schema, backend="outlines:disable-any-whitespace,"
                         "disable-additional-properties"), SERVER_DEFAULT)
    assert constraint.backend == "llguidance" and constraint.whitespace_pattern == ""
    closed = json.loads(constraint.json_schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] is True  # said explicitly: kept
    # No name: the server default and its options; a client's own pattern always wins.
    loose = BackendChoice("auto:any-whitespace", "llguidance", frozenset({"any-whitespace"}))
    assert apply_backend(OutputConstraint(json_object=True), loose).whitespace_pattern == (
        ANY_JSON_WHITESPACE)
    mine = OutputConstraint(json_object=True, whitespace_pattern="[ ]?")
    assert apply_backend(mine, loose).whitespace_pattern == "[ ]?"
    # Not JSON: the options do not apply.
    assert apply_backend(OutputConstraint(regex="a+", backend="outlines:any-whitespace"),
                         SERVER_DEFAULT).whitespace_pattern is None


def test_json_whitespace_is_bounded_by_default(backend) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                         "required": ["a"], "additionalProperties": False})
    default = OutputConstraint(json_schema=schema)
    assert _accepts(backend, default, '{"a":1}')
    assert _accepts(backend, default, '{"a": 1}')
    assert _accepts(backend, default, '{\n  "a": 1\n}')
    assert not _accepts(backend, default, '{"a":     1}')
    assert not _accepts(backend, default, '{\n\n\n"a": 1}')
    compact = apply_backend(OutputConstraint(json_schema=schema,
                                             backend="xgrammar:disable-any-whitespace"),
                            SERVER_DEFAULT)
    assert _accepts(backend, compact, '{"a":1}') and not _accepts(backend, compact, '{"a": 1}')
    flexible = apply_backend(OutputConstraint(json_schema=schema, backend="auto:any-whitespace"),
                             SERVER_DEFAULT)
    assert _accepts(backend, flexible, '{"a":     1}')


def test_closed_objects_refuse_extra_properties(backend) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    extra = '{"a":1,"b":2}'
    assert _accepts(backend, OutputConstraint(json_schema=schema), extra)
    closed = apply_backend(OutputConstraint(
        json_schema=schema, backend="xgrammar:disable-additional-properties"), SERVER_DEFAULT)
    assert not _accepts(backend, closed, extra) and _accepts(backend, closed, '{"a":1}')


def test_regex_classes_are_ascii(backend) -> None:
    digits = OutputConstraint(regex=r"\d{3}")
    assert _accepts(backend, digits, "123")
    assert not _accepts(backend, digits, "\u0661\u0662\u0663")  # Arabic-Indic digits
    # Bounded, so that a full match also terminates the matcher.
    word = OutputConstraint(regex=r"\w{2,4}\s\w{2}")
    assert _accepts(backend, word, "ab_9 cd")
    assert not _accepts(backend, word, "caf\u00e9 xy")  # a non-ASCII letter
    assert not _accepts(backend, word, "ab\u00a0cd")  # a non-ASCII space


@pytest.mark.parametrize("regex, expected", [
    (r"\d{3}", "[0-9]{3}"),
    (r"[\d-]+", "[0-9-]+"),
    (r"\\d", r"\\d"),  # an escaped backslash, then a letter
    (r"[^\d]", "[^0-9]"),
    (r"\D\W", "[^0-9][^A-Za-z0-9_]"),
    (r"[\D]", r"[\D]"),  # no one-bracket ASCII spelling: left as written
    (r"[]\d]", "[]0-9]"),
    (r"a\.b\s", r"a\.b[ \t\n\r\f\v]"),
])
def test_ascii_class_escapes(regex: str, expected: str) -> None:
    assert ascii_class_escapes(regex) == expected


def test_xgrammar_honours_the_whitespace_options(tiny_llama_dir: Path) -> None:
    """xgrammar has no whitespace pattern: compact, flexible and the default bound map onto
    its own options, with the same accept / refuse as llguidance above."""
    pytest.importorskip("xgrammar")
    from engine.structured.xgrammar_backend import XGrammarBackend

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    xgrammar = XGrammarBackend(TokenizerInfo(tokenizer, len(tokenizer),
                                             (tokenizer.eos_token_id,)))

    def accepts(constraint: OutputConstraint, text: str) -> bool:
        grammar = xgrammar.compile(constraint).new_grammar()
        ids = tokenizer.encode(text, add_special_tokens=False)
        # xgrammar terminates on the stop token itself.
        return grammar.accept_tokens(ids) and grammar.accept_token(tokenizer.eos_token_id)

    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                         "required": ["a"], "additionalProperties": False})
    spaced = '{"a":' + " " * 20 + "1}"
    assert accepts(OutputConstraint(json_schema=schema), '{"a": 1}')
    assert not accepts(OutputConstraint(json_schema=schema), spaced)
    compact = OutputConstraint(json_schema=schema, whitespace_pattern="")
    assert accepts(compact, '{"a":1}') and not accepts(compact, '{"a": 1}')
    assert accepts(OutputConstraint(json_schema=schema, whitespace_pattern=ANY_JSON_WHITESPACE),
                   spaced)
    digits = OutputConstraint(regex=r"\d{3}")
    assert accepts(digits, "123") and not accepts(digits, "\u0661\u0662\u0663")
