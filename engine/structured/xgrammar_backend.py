"""xgrammar: the optional backend (`pip install protoserve[structured-xgrammar]`).

Eager compilation (up to ~170 ms for a 5-field schema on CPU), done on the compile thread like
every compilation. `grammar` constraints are EBNF (GBNF) here, not Lark. xgrammar has no
whitespace pattern, so the three patterns the server uses map onto its options
(`_json_whitespace`): "" is compact JSON, ANY_JSON_WHITESPACE its flexible whitespace, and
the default bounded whitespace at most 17 whitespace characters per position (the bounded
pattern's newline and 16 spaces); any other client pattern falls back to that bound.

Importing this module imports xgrammar; the registry imports it only when the backend is used.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from engine.errors import InvalidRequestError
from engine.structured.constraint import ANY_JSON_WHITESPACE, ConstraintKind, OutputConstraint
from engine.structured.grammar import Grammar, GrammarBackend, TokenizerInfo
from engine.structured.regex_classes import ascii_class_escapes

# The default bounded JSON whitespace (constraint.BOUNDED_JSON_WHITESPACE): a newline and up to
# 16 spaces of indent per position.
_BOUNDED_WHITESPACE_CHARS = 17


class XGrammarGrammar:
    __slots__ = ("backend", "matcher", "_error")

    def __init__(self, backend: XGrammarBackend, matcher: xgr.GrammarMatcher) -> None:
        self.backend: GrammarBackend = backend
        self.matcher = matcher
        self._error = ""

    def accept_token(self, token_id: int) -> bool:
        if self.matcher.accept_token(token_id):
            return True
        self._error = f"token {token_id} is not allowed by the grammar here"
        return False

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        return all(self.accept_token(t) for t in token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    @property
    def error(self) -> str:
        return self._error

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)


class _Compiled:
    __slots__ = ("backend", "compiled")

    def __init__(self, backend: XGrammarBackend, compiled: xgr.CompiledGrammar) -> None:
        self.backend = backend
        self.compiled = compiled

    def new_grammar(self) -> Grammar:
        return XGrammarGrammar(self.backend, xgr.GrammarMatcher(self.compiled))


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, info: TokenizerInfo) -> None:
        tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            info.hf_tokenizer,
            vocab_size=info.vocab_size,
            stop_token_ids=list(info.eos_token_ids),
        )
        # Our own LRU sits in front; xgrammar's cache would only duplicate it.
        self.compiler = xgr.GrammarCompiler(tokenizer_info, cache_enabled=False)

    def compile(self, constraint: OutputConstraint) -> _Compiled:
        kind = constraint.kind
        try:
            if kind in (ConstraintKind.JSON_SCHEMA, ConstraintKind.JSON_OBJECT):
                schema = (constraint.json_schema or "" if kind is ConstraintKind.JSON_SCHEMA
                          else '{"type": "object"}')
                compiled = self.compiler.compile_json_schema(
                    schema, **_json_whitespace(constraint.whitespace_pattern))
            elif kind is ConstraintKind.REGEX:
                compiled = self.compiler.compile_regex(
                    ascii_class_escapes(constraint.regex or ""))
            elif kind is ConstraintKind.CHOICE:
                compiled = self.compiler.compile_grammar(_choice_ebnf(constraint))
            else:
                compiled = self.compiler.compile_grammar(constraint.grammar or "")
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(
                f"invalid {kind.value}: {exc}", field=constraint.field
            ) from None
        return _Compiled(self, compiled)

    @staticmethod
    def validate(constraint: OutputConstraint) -> None:
        """The grammar check of `compile` without a tokenizer (the serving side's, before a
        request queues): xgrammar parses grammars into `xgr.Grammar` with no tokenizer."""
        kind = constraint.kind
        try:
            if kind is ConstraintKind.JSON_SCHEMA:
                xgr.Grammar.from_json_schema(constraint.json_schema or "")
            elif kind is ConstraintKind.REGEX:
                xgr.Grammar.from_regex(ascii_class_escapes(constraint.regex or ""))
            elif kind is ConstraintKind.CHOICE:
                xgr.Grammar.from_ebnf(_choice_ebnf(constraint))
            elif kind is ConstraintKind.GRAMMAR:
                xgr.Grammar.from_ebnf(constraint.grammar or "")
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(
                f"invalid {kind.value}: {exc}", field=constraint.field
            ) from None

    def fill_bitmasks(
        self, grammars: Sequence[Grammar], rows: Sequence[int], bitmask: torch.Tensor
    ) -> None:
        for grammar, row in zip(grammars, rows):
            grammar.fill_bitmask(bitmask, row)


def _json_whitespace(pattern: str | None) -> dict[str, Any]:
    if pattern == "":
        return {"any_whitespace": False, "separators": (",", ":")}
    if pattern == ANY_JSON_WHITESPACE:
        return {"any_whitespace": True}
    return {"any_whitespace": True, "max_whitespace_cnt": _BOUNDED_WHITESPACE_CHARS}


def _choice_ebnf(constraint: OutputConstraint) -> str:
    options = " | ".join(
        json.dumps(option, ensure_ascii=False) for option in constraint.choice or ()
    )
    return f"root ::= {options}"
