"""Reasoning parsers: a choice's text -> reasoning text and content, incrementally.

Each format is a pair of markers around the reasoning:

    deepseek_r1   <think> ... </think>     the template opens the block itself, so output
                                           before </think> is reasoning even without <think>
    qwen3         <think> ... </think>     reasoning only if the output opens the block;
                                           with enable_thinking false the template closes an
                                           empty block in the prompt and all output is content
    mistral       [THINK] ... [/THINK]     Magistral; reasoning only if the output opens it

Where the reasoning starts is read from the end of the rendered prompt: a prompt ending in
the start marker puts the output inside the block, one ending in the end marker (thinking
off) puts it after. The structured-output gate (engine.structured.reasoning_gate) reads the
same markers as token ids, so a constraint starts exactly where content starts here.

Markers split across deltas are held back until they are known, so the pieces of a stream
add up to what the whole text gives.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class ReasoningState(enum.Enum):
    UNDECIDED = "undecided"  # the output may still open a block
    REASONING = "reasoning"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    name: str
    start: str
    end: str
    # Output before the end marker is reasoning even if the output never wrote the start.
    implicit_start: bool

    def initial_state(self, prompt_text: str | None) -> ReasoningState:
        tail = (prompt_text or "").rstrip()
        if tail.endswith(self.start):
            return ReasoningState.REASONING
        if tail.endswith(self.end):
            return ReasoningState.ENDED
        return ReasoningState.REASONING if self.implicit_start else ReasoningState.UNDECIDED


REASONING_FORMATS: dict[str, ReasoningFormat] = {
    "deepseek_r1": ReasoningFormat("deepseek_r1", "<think>", "</think>", implicit_start=True),
    "qwen3": ReasoningFormat("qwen3", "<think>", "</think>", implicit_start=False),
    "mistral": ReasoningFormat("mistral", "[THINK]", "[/THINK]", implicit_start=False),
}


@dataclass(slots=True)
class ReasoningPiece:
    reasoning: str = ""
    content: str = ""


class ReasoningStream:
    """Splits one choice's text into reasoning and content as it arrives."""

    def __init__(self, fmt: ReasoningFormat, prompt_text: str | None = None) -> None:
        self.format = fmt
        self.state = fmt.initial_state(prompt_text)
        self._held = ""
        self._block_fresh = self.state is ReasoningState.REASONING

    def feed(self, text: str) -> ReasoningPiece:
        piece = ReasoningPiece()
        held, self._held = self._held + text, ""
        while held:
            if self.state is ReasoningState.ENDED:
                piece.content += held
                return piece
            if self.state is ReasoningState.UNDECIDED:
                stripped = held.lstrip()
                if stripped.startswith(self.format.start):
                    # Leading whitespace before the block is dropped, as the block is.
                    held = stripped[len(self.format.start):]
                    self.state = ReasoningState.REASONING
                    continue
                if self.format.start.startswith(stripped):
                    self._held = held  # still possibly the start marker
                    return piece
                self.state = ReasoningState.ENDED
                continue
            if self._block_fresh:
                # deepseek_r1's implicit block: a start marker the model writes anyway is
                # dropped, but only right at the block's start.
                if held.startswith(self.format.start):
                    held = held[len(self.format.start):]
                elif self.format.start.startswith(held):
                    self._held = held
                    return piece
                self._block_fresh = False
                continue
            end = held.find(self.format.end)
            if end >= 0:
                piece.reasoning += held[:end]
                held = held[end + len(self.format.end):]
                self.state = ReasoningState.ENDED
                continue
            keep = _partial_marker_tail(held, (self.format.end,))
            piece.reasoning += held[:len(held) - keep]
            self._held = held[len(held) - keep:] if keep else ""
            return piece
        return piece

    def finish(self) -> ReasoningPiece:
        held, self._held = self._held, ""
        if self.state is ReasoningState.REASONING:
            return ReasoningPiece(reasoning=held)
        # An undecided tail (e.g. "<thi") was content after all.
        return ReasoningPiece(content=held)


def _partial_marker_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                longest = max(longest, size)
                break
    return longest
