"""Guided decoding on the offline engine with a random-weight model: every output matches its
constraint, also under preemption; dead ends finish with CONSTRAINT; compile errors are
named; compiled grammars are cached."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from guided_helpers import (
    CHOICES,
    CODE_REGEX,
    COMPACT_WHITESPACE,
    PERSON_SCHEMA,
    assert_full_match,
    assert_valid_json,
)

from engine.errors import InvalidRequestError
from engine.frontend.llm import LLM
from engine.core.core_request import CoreRequest
from engine.core.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.structured import OutputConstraint
from engine.structured.compiler import GrammarCompiler

PROMPT = [0, 40, 41, 42, 43]
SEEDS = range(20)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=256)


def _decode(llm: LLM, token_ids: list[int]) -> str:
    return llm.grammar_compiler.info.hf_tokenizer.decode(token_ids, skip_special_tokens=True)


def _sampled(max_tokens: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens) for seed in SEEDS]


def test_json_schema_regex_and_choice_hold_over_20_seeds(llm: LLM) -> None:
    schema = OutputConstraint(json_schema=json.dumps(PERSON_SCHEMA),
                              whitespace_pattern=COMPACT_WHITESPACE)
    regex = OutputConstraint(regex=CODE_REGEX)
    choice = OutputConstraint(choice=CHOICES)
    n = len(SEEDS)
    outputs = llm.generate(
        [PROMPT] * (3 * n), _sampled(120) * 3, constraints=[schema] * n + [regex] * n + [choice] * n
    )
    for i, out in enumerate(outputs):
        text = _decode(llm, out.token_ids)
        assert out.finish_reason is FinishReason.STOP, (out, text)
        if i < n:
            assert_valid_json(text, PERSON_SCHEMA)
        elif i < 2 * n:
            assert_full_match(text, CODE_REGEX)
        else:
            assert text in CHOICES


def test_default_flexible_whitespace_and_json_object(llm: LLM) -> None:
    outputs = llm.generate(
        [PROMPT] * 4, _sampled(300)[:4],
        constraints=[OutputConstraint(json_schema=json.dumps(PERSON_SCHEMA))] * 2
        + [OutputConstraint(json_object=True, whitespace_pattern="")] * 2,
    )
    for out in outputs[:2]:
        if out.finish_reason is FinishReason.STOP:  # flexible whitespace may run long
            assert_valid_json(_decode(llm, out.token_ids), PERSON_SCHEMA)
    for out in outputs[2:]:
        text = _decode(llm, out.token_ids)
        if out.finish_reason is FinishReason.STOP:
            assert isinstance(json.loads(text), dict)
        else:  # max_tokens cut it: still a prefix of a JSON object
            assert out.finish_reason is FinishReason.LENGTH and text.startswith("{")



def test_greedy_and_grammar_mixed_with_unconstrained_rows(llm: LLM) -> None:
    outputs = llm.generate(
        [PROMPT] * 3, SamplingParams(temperature=0.0, max_tokens=40),
        constraints=[OutputConstraint(regex=CODE_REGEX), None, OutputConstraint(choice=CHOICES)],
    )
    assert_full_match(_decode(llm, outputs[0].token_ids), CODE_REGEX)
    assert outputs[1].finish_reason is FinishReason.LENGTH  # random text, unconstrained
    assert _decode(llm, outputs[2].token_ids) in CHOICES


def test_preemption_keeps_matchers_consistent(tiny_llama_dir: Path) -> None:
    # 32 blocks of 4 tokens (one request's 5 + 120 tokens fit) for 8 requests that each grow
    # past 30 tokens: preemption is certain.
    small = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_kv_blocks=32)

    constraint = OutputConstraint(json_schema=json.dumps(PERSON_SCHEMA), whitespace_pattern="")
    outputs = small.generate([PROMPT] * 8, _sampled(120)[:8], constraints=constraint)
    assert small.core.scheduler.num_preemptions > 0
    for out in outputs:
        assert out.finish_reason is FinishReason.STOP
        assert_valid_json(_decode(small, out.token_ids), PERSON_SCHEMA)


def test_max_tokens_cuts_with_length(llm: LLM) -> None:
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=1, max_tokens=3),
                          constraints=OutputConstraint(json_schema=json.dumps(PERSON_SCHEMA)))
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 3


class _FakeBackend:
    name = "fake"

    def fill_bitmasks(self, grammars, rows, bitmask: torch.Tensor) -> None:
        for grammar, row in zip(grammars, rows):
            grammar.fill_bitmask(bitmask, row)


class _DeadEndGrammar:
    """Allows any token for `steps` tokens, then nothing at all."""

    def __init__(self, steps: int) -> None:
        self.backend = _FakeBackend()
        self.steps = steps
        self.accepted = 0
        self.error = ""
        self.is_terminated = False

    def accept_token(self, token_id: int) -> bool:
        if self.accepted < self.steps:
            self.accepted += 1
            return True
        self.error = "no token fits here"
        return False

    def accept_tokens(self, token_ids) -> bool:
        return all(self.accept_token(t) for t in token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = -1 if self.accepted < self.steps else 0

    def rollback(self, num_tokens: int) -> None:
        self.accepted -= num_tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_dead_end_finishes_with_constraint_not_garbage(llm: LLM, temperature: float) -> None:
    request = CoreRequest("dead-end", tuple(PROMPT),
                          SamplingParams(temperature=temperature, max_tokens=50), max_tokens=50)
    llm.core.add_request(request, grammar=_DeadEndGrammar(steps=3))
    outputs = []
    while llm.core.has_unfinished_requests:
        outputs.extend(llm.core.step())
    assert outputs[-1].finish_reason is FinishReason.CONSTRAINT
    # The rejected token is not emitted.
    assert sum(len(out.new_token_ids) for out in outputs) == 3
    assert "no token fits here" in (outputs[-1].finish_message or "")


def test_compile_cache_hits_and_bound(llm: LLM) -> None:
    compiler = GrammarCompiler(llm.grammar_compiler.info, cache_size=2)
    first = compiler.compile(OutputConstraint(regex="x+"))
    assert compiler.compile(OutputConstraint(regex="x+")) is first
    assert (compiler.num_cache_hits, compiler.num_cache_misses) == (1, 1)
    compiler.compile(OutputConstraint(regex="x+", whitespace_pattern=" "))  # another key
    compiler.compile(OutputConstraint(choice=("x+",)))  # same text, another kind
    assert compiler.num_cache_misses == 3 and compiler.cache_len == 2
    # Matchers from one cached grammar are independent (one per choice when n > 1).
    a, b = compiler.new_grammars(OutputConstraint(regex="ab|ac"), 2)
    assert a.accept_token(llm.grammar_compiler.info.hf_tokenizer.encode("a")[-1])
    assert not b.is_terminated


@pytest.mark.parametrize(
    ("constraint", "field", "reason"),
    [
        (OutputConstraint(regex="(abc"), "constraint.regex", "unclosed group"),
        (OutputConstraint(json_schema="{not json"), "constraint.json_schema", "not valid JSON"),
        (OutputConstraint(json_schema='{"type": "nope"}'), "constraint.json_schema", "nope"),
        (OutputConstraint(json_schema="[1]"), "constraint.json_schema", "JSON object"),
        (OutputConstraint(grammar="start: missing_rule"), "constraint.grammar", "missing_rule"),
        (OutputConstraint(choice=()), "constraint.choice", "at least one"),
        (OutputConstraint(regex="a", choice=("a",)), "constraint.choice", "only one kind"),
        (OutputConstraint(), "constraint", "needs one of"),
        (OutputConstraint(regex="a", backend="outlines"), "constraint.backend", "unknown"),
    ],
)
def test_bad_constraints_name_the_field(
    llm: LLM, constraint: OutputConstraint, field: str, reason: str
) -> None:
    """At the offline API's boundary (the shape) and in the core's compile (the grammar),
    before anything runs."""
    steps = llm.core.num_steps
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([PROMPT], SamplingParams(max_tokens=5), constraints=constraint)
    assert info.value.field == field and reason in info.value.message
    assert llm.core.num_steps == steps and not llm.core.has_unfinished_requests


@pytest.mark.skipif(importlib.util.find_spec("xgrammar") is not None, reason="xgrammar installed")
def test_missing_optional_backend_is_named(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="not installed") as info:
        llm.grammar_compiler.compile(OutputConstraint(regex="a", backend="xgrammar"))
    assert info.value.field == "constraint.backend"


def test_xgrammar_backend_when_installed(tiny_llama_dir: Path) -> None:
    pytest.importorskip("xgrammar")
    xg = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64,
             guided_decoding_backend="xgrammar")
    outputs = xg.generate([PROMPT] * 4, _sampled(40)[:4], constraints=OutputConstraint(regex=CODE_REGEX))
    for out in outputs:
        assert_full_match(_decode(xg, out.token_ids), CODE_REGEX)


def test_rollback_restores_the_matcher(llm: LLM) -> None:
    tokenizer = llm.grammar_compiler.info.hf_tokenizer
    (grammar,) = llm.grammar_compiler.new_grammars(OutputConstraint(choice=("abc",)), 1)
    ids = tokenizer.encode("abc", add_special_tokens=False)
    assert grammar.accept_tokens(ids) and grammar.is_terminated
    grammar.rollback(len(ids))
    assert not grammar.is_terminated and grammar.accept_tokens(ids)
