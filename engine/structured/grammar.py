"""The contracts between the engine and a structured-output library.

    GrammarBackend.validate(constraint)                      (serving side, no tokenizer)
    GrammarBackend.compile(constraint)  -> CompiledGrammar   (engine core, compile thread)
    CompiledGrammar.new_grammar()       -> Grammar           (one per choice, same thread)
    backend.fill_bitmasks(...)                                (step thread, once per step)
    Grammar.accept_token(token_id)                            (step thread, scheduler)

A Grammar is per-request matcher state; it is touched by exactly one thread at a time: built
on the compile thread, then handed to the step thread with its Request and never shared.

Bitmasks are int32 [rows, ceil(vocab / 32)]: bit j of word w allows token 32 * w + j. The
scheduler imports nothing from here at run time (it stays torch-free): it only calls the
plain-Python methods of a Grammar.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from engine.structured.constraint import OutputConstraint


@dataclass(frozen=True, slots=True)
class TokenizerInfo:
    """What a backend needs to map grammar bytes to token ids."""

    hf_tokenizer: Any  # a transformers fast tokenizer
    # Width of the model's logits (may exceed the tokenizer's vocabulary: padded embeddings).
    vocab_size: int
    # Every id that ends generation; a grammar allows them only where it may end.
    eos_token_ids: tuple[int, ...]


class Grammar(Protocol):
    backend: GrammarBackend

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and `error` set) when the grammar rejects it."""
        ...

    def accept_tokens(self, token_ids: Sequence[int]) -> bool: ...

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (CPU int32)."""
        ...

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and admits nothing more (but EOS)."""
        ...

    @property
    def error(self) -> str:
        """Why the last accept failed; empty when it did not."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens."""
        ...


class CompiledGrammar(Protocol):
    def new_grammar(self) -> Grammar:
        """Fresh matcher state at the start of the grammar."""
        ...


class GrammarBackend(Protocol):
    name: str

    def compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        """Compile (or validate and prepare) a constraint. Slow: never on the step thread.
        Raises InvalidRequestError naming the constraint's field with the backend's reason."""
        ...

    @staticmethod
    def validate(constraint: OutputConstraint) -> None:
        """Check the constraint's grammar without a tokenizer (no token table, no matcher):
        the serving side's check before a request queues. Raises InvalidRequestError as
        `compile` does."""
        ...

    def fill_bitmasks(
        self, grammars: Sequence[Grammar], rows: Sequence[int], bitmask: torch.Tensor
    ) -> None:
        """Fill `bitmask[rows[i]]` for `grammars[i]` (all of this backend), in one batch call
        where the library has one."""
        ...
