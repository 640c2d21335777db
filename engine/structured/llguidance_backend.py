"""llguidance: the default backend. Lazy grammars (compiling a JSON schema costs ~1 ms) and a
batched, GIL-free bitmask fill.

A compiled constraint is a *template* matcher whose first mask has been computed once on the
compile thread: that builds the lexer states the first step needs, and `deep_copy()` of the
template shares them, so new requests start in microseconds and the step thread never pays
for lexer construction of the first token.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from llguidance import LLExecutor, LLMatcher

from engine.errors import InvalidRequestError
from engine.structured.constraint import BOUNDED_JSON_WHITESPACE, ConstraintKind, OutputConstraint
from engine.structured.grammar import Grammar, TokenizerInfo
from engine.structured.regex_classes import ascii_class_escapes

if TYPE_CHECKING:
    from engine.structured.grammar import GrammarBackend

# log_level 0: errors are read through is_error()/get_error() and reported to the client;
# printing them to stderr too would only be noise.
_LOG_LEVEL = 0


class LLGuidanceGrammar:
    __slots__ = ("backend", "matcher", "_error")

    def __init__(self, backend: LLGuidanceBackend, matcher: LLMatcher) -> None:
        self.backend: GrammarBackend = backend
        self.matcher = matcher
        self._error = ""

    def accept_token(self, token_id: int) -> bool:
        if self.matcher.consume_token(token_id):
            return True
        self._error = self.matcher.get_error() or f"token {token_id} is not allowed here"
        return False

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        if self.matcher.consume_tokens(list(token_ids)):
            return True
        self._error = self.matcher.get_error() or "tokens are not allowed here"
        return False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._error

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)


class _CompiledTemplate:
    __slots__ = ("backend", "template")

    def __init__(self, backend: LLGuidanceBackend, template: LLMatcher) -> None:
        self.backend = backend
        self.template = template

    def new_grammar(self) -> Grammar:
        return LLGuidanceGrammar(self.backend, self.template.deep_copy())


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, info: TokenizerInfo) -> None:
        # ~1 s for a 128k vocabulary: built once per engine, on the compile thread.
        self.tokenizer = llguidance.hf.from_tokenizer(
            info.hf_tokenizer, n_vocab=info.vocab_size, eos_token=list(info.eos_token_ids)
        )
        self.vocab_size = info.vocab_size
        # Computes the masks of a batch in parallel, outside the GIL.
        self.executor = LLExecutor()

    def compile(self, constraint: OutputConstraint) -> _CompiledTemplate:
        grammar = self._grammar_text(constraint)
        template = LLMatcher(self.tokenizer, grammar, log_level=_LOG_LEVEL)
        if template.is_error():
            raise InvalidRequestError(
                f"invalid {constraint.kind.value}: {_first_lines(template.get_error())}",
                field=constraint.field,
            )
        scratch = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
        llguidance.torch.fill_next_token_bitmask(template, scratch, 0)
        if template.is_error():
            raise InvalidRequestError(
                f"{constraint.kind.value} cannot start: {_first_lines(template.get_error())}",
                field=constraint.field,
            )
        return _CompiledTemplate(self, template)

    @staticmethod
    def validate(constraint: OutputConstraint) -> None:
        """The grammar check of `compile` without a tokenizer (the serving side's, before a
        request queues; no token table, no matcher). Same messages as `compile`; what only
        a tokenizer can tell (a grammar that cannot start) is left to the core's compile.
        Releases the GIL while it parses."""
        error = LLMatcher.validate_grammar(LLGuidanceBackend._grammar_text(constraint))
        if error:
            raise InvalidRequestError(
                f"invalid {constraint.kind.value}: {_first_lines(error)}", field=constraint.field
            )

    def fill_bitmasks(
        self, grammars: Sequence[Grammar], rows: Sequence[int], bitmask: torch.Tensor
    ) -> None:
        if len(grammars) == 1:
            grammars[0].fill_bitmask(bitmask, rows[0])
            return
        pairs = [(g.matcher, row) for g, row in zip(grammars, rows)]  # type: ignore[attr-defined]
        llguidance.torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    @staticmethod
    def _grammar_text(constraint: OutputConstraint) -> str:
        kind = constraint.kind
        if kind is ConstraintKind.REGEX:
            return LLMatcher.grammar_from_regex(ascii_class_escapes(constraint.regex or ""))
        if kind is ConstraintKind.GRAMMAR:
            return LLMatcher.grammar_from_lark(constraint.grammar or "")
        if kind is ConstraintKind.CHOICE:
            # Lark string literals take JSON escapes, so any option text is matched literally.
            options = " | ".join(json.dumps(option) for option in constraint.choice or ())
            return LLMatcher.grammar_from_lark(f"start: {options}")
        schema = _schema_of(constraint)
        pattern = constraint.whitespace_pattern
        overrides = {"whitespace_pattern":
                     BOUNDED_JSON_WHITESPACE if pattern is None else pattern}
        try:
            return LLMatcher.grammar_from_json_schema(schema, overrides=overrides)
        except ValueError as exc:
            raise InvalidRequestError(
                f"invalid {kind.value}: {exc}", field=constraint.field
            ) from None


def _schema_of(constraint: OutputConstraint) -> dict:
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return {"type": "object"}
    try:
        schema = json.loads(constraint.json_schema or "")
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"json_schema is not valid JSON: {exc}", field=constraint.field
        ) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("json_schema must be a JSON object", field=constraint.field)
    return schema


def _first_lines(message: str, limit: int = 600) -> str:
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + "..."
