"""Structured output waits for the reasoning to end: a constraint holds the answer, never
the thought before it.

A request read by a reasoning parser (engine.output_parsing.reasoning) whose constraint
carries a ReasoningGate gets a GatedGrammar: a wrapper that leaves every token allowed and
feeds the real matcher nothing until the reasoning end token has been generated.

    state        mask                          a sampled token
    REASONING    everything                    the end token -> ENDED; nothing reaches the matcher
    UNDECIDED    the matcher's | the start     the start token -> REASONING; any other
                                               -> ENDED and it is the matcher's first token
    ENDED        the matcher's                 the matcher's

The state at the first output token comes from the end of the prompt, as the text parser
reads it: a prompt ending (blank tokens aside) in the start token is inside the block, one
ending in the end token (thinking switched off) is after it, anything else is REASONING for
formats whose template opens the block itself (implicit_start) and UNDECIDED otherwise.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.structured.constraint import GateState, ReasoningGate
from engine.structured.grammar import Grammar, GrammarBackend

if TYPE_CHECKING:
    import torch

class GatedGrammar:
    """A Grammar that lets the reasoning through unconstrained (see the module doc)."""

    def __init__(self, inner: Grammar, gate: ReasoningGate, state: GateState,
                 backend: GateBackend) -> None:
        self.inner = inner
        self.gate = gate
        self.state = state
        self.backend = backend
        # Per accepted token: the state before it and whether the matcher took it (rollback).
        self._history: list[tuple[GateState, bool]] = []

    def accept_token(self, token_id: int) -> bool:
        before = self.state
        if before is GateState.REASONING:
            if token_id == self.gate.end_token_id:
                self.state = GateState.ENDED
            self._history.append((before, False))
            return True
        if before is GateState.UNDECIDED and token_id == self.gate.start_token_id:
            self.state = GateState.REASONING
            self._history.append((before, False))
            return True
        self.state = GateState.ENDED
        if not self.inner.accept_token(token_id):
            self.state = before
            return False
        self._history.append((before, True))
        return True

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        return all(self.accept_token(token_id) for token_id in token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.backend.fill_bitmasks([self], [row], bitmask)

    @property
    def is_terminated(self) -> bool:
        return self.state is GateState.ENDED and self.inner.is_terminated

    @property
    def error(self) -> str:
        return self.inner.error

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        undone = self._history[-num_tokens:]
        del self._history[-num_tokens:]
        self.inner.rollback(sum(1 for _, fed in undone if fed))
        self.state = undone[0][0]


class GateBackend:
    """Fills the rows of gated grammars: all ones while reasoning, the inner backend's mask
    after (plus the start token while undecided). One per inner backend, so a batch's gated
    grammars still fill in one call of that backend."""

    def __init__(self, inner: GrammarBackend) -> None:
        self.inner = inner
        self.name = f"{inner.name}+reasoning-gate"

    def fill_bitmasks(self, grammars: Sequence[GatedGrammar], rows: Sequence[int],
                      bitmask: torch.Tensor) -> None:
        inner_grammars, inner_rows = [], []
        for grammar, row in zip(grammars, rows, strict=True):
            if grammar.state is GateState.REASONING:
                bitmask[row] = -1  # every bit set: any token
            else:
                inner_grammars.append(grammar.inner)
                inner_rows.append(row)
        if inner_grammars:
            self.inner.fill_bitmasks(inner_grammars, inner_rows, bitmask)
        for grammar, row in zip(grammars, rows, strict=True):
            start = grammar.gate.start_token_id
            if grammar.state is GateState.UNDECIDED and start is not None:
                word, bit = divmod(start, 32)
                # int32 words: bit 31 is the sign bit.
                value = int(bitmask[row, word]) | (1 << bit)
                bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value

    def compile(self, constraint):  # pragma: no cover - gates wrap compiled grammars only
        raise TypeError("a GateBackend only fills masks")

    @staticmethod
    def validate(constraint) -> None:  # pragma: no cover
        raise TypeError("a GateBackend only fills masks")
