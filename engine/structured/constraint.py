"""What a request asks its output to match: plain data, validated once at the boundary.

Mirrors the proto's `OutputConstraint` (one kind per request) so the offline engine and the
servers share one type. No torch and no backend imports: anyone may import it.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.errors import InvalidRequestError

# Whitespace between JSON tokens when a request sets no whitespace_pattern: at each position
# at most one space, or a newline and an indent of up to 16 spaces. Unbounded whitespace lets
# a weak or random-weight model write whitespace until max_tokens and never close the object.
BOUNDED_JSON_WHITESPACE = r"(\n[ ]{0,16}|[ ]?)"
# What JSON itself allows (the `any-whitespace` backend option).
ANY_JSON_WHITESPACE = r"[ \t\n\r]*"


# How far back from the prompt's end blank tokens are skipped to find a reasoning marker.
_MAX_BLANK_TAIL = 16


class GateState(enum.Enum):
    REASONING = "reasoning"
    UNDECIDED = "undecided"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class ReasoningGate:
    end_token_id: int
    start_token_id: int | None = None
    # The chat template opens the reasoning block itself (deepseek_r1).
    implicit_start: bool = False

    def initial_state(
        self, prompt_token_ids: Sequence[int], is_blank: Callable[[int], bool]
    ) -> GateState:
        for token_id in reversed(prompt_token_ids[-_MAX_BLANK_TAIL:]):
            if token_id == self.start_token_id:
                return GateState.REASONING
            if token_id == self.end_token_id:
                return GateState.ENDED
            if not is_blank(token_id):
                break
        return GateState.REASONING if self.implicit_start else GateState.UNDECIDED


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"  # Lark for llguidance, EBNF (GBNF) for xgrammar
    JSON_OBJECT = "json_object"  # any JSON object


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """Exactly one of json_schema / regex / choice / grammar / json_object.

    `whitespace_pattern` (a regex) replaces the default bounded whitespace between JSON
    tokens (BOUNDED_JSON_WHITESPACE); it applies to the JSON kinds only. `backend` None means
    the server default.
    """

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_pattern: str | None = None
    backend: str | None = None
    # Set for a request read by a reasoning parser: the constraint starts only once the
    # reasoning has ended (engine.structured.reasoning_gate).
    reasoning: ReasoningGate | None = None

    @property
    def kind(self) -> ConstraintKind:
        kinds = self._given_kinds()
        if len(kinds) != 1:
            self.validate()
        return kinds[0]

    @property
    def field(self) -> str:
        """The request field an error about this constraint names."""
        return f"constraint.{self.kind.value}"

    @property
    def spec(self) -> str:
        """The constraint's text (the choices joined by NUL for the cache key)."""
        kind = self.kind
        if kind is ConstraintKind.CHOICE:
            return "\0".join(self.choice or ())
        if kind is ConstraintKind.JSON_OBJECT:
            return ""
        return getattr(self, kind.value)

    def validate(self) -> None:
        """Raise InvalidRequestError naming the field: none or several kinds, empty choices."""
        kinds = self._given_kinds()
        if not kinds:
            raise InvalidRequestError(
                "constraint needs one of json_schema, regex, choice, grammar or json_object",
                field="constraint",
            )
        if len(kinds) > 1:
            names = ", ".join(k.value for k in kinds)
            raise InvalidRequestError(
                f"only one kind of constraint may be given per request, got {names}",
                field=f"constraint.{kinds[1].value}",
            )
        if kinds[0] is ConstraintKind.CHOICE and not self.choice:
            raise InvalidRequestError("choice must list at least one option", field="constraint.choice")
        if self.backend is not None and not self.backend:
            raise InvalidRequestError("backend must not be empty", field="constraint.backend")

    def _given_kinds(self) -> list[ConstraintKind]:
        kinds = [
            kind
            for kind, value in (
                (ConstraintKind.JSON_SCHEMA, self.json_schema),
                (ConstraintKind.REGEX, self.regex),
                (ConstraintKind.CHOICE, self.choice),
                (ConstraintKind.GRAMMAR, self.grammar),
            )
            if value is not None
        ]
        if self.json_object:
            kinds.append(ConstraintKind.JSON_OBJECT)
        return kinds
