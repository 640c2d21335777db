"""Guided decoding: forbid every token the row's grammar does not allow next.

Applied first in the recipe, so bias, penalties, temperature and top-k/p all see the masked
distribution. Only rows with a grammar are touched:

    bitmask [G, ceil(V/32)] int32   one batch fill per backend (GIL-free for llguidance)
       -> bits [G, V] bool          plain torch shifts (no torch.compile'd helper)
       -> logits[rows].masked_fill(~bits, -inf)

A row whose grammar allows nothing at all (a dead end) is left unmasked: softmax of an
all -inf row would be NaN. The token sampled there is then rejected by the grammar in the
scheduler, which finishes the request with reason CONSTRAINT.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.structured.grammar import Grammar

_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


def fill_grammar_bitmask(grammars: Sequence[Grammar], vocab_size: int) -> torch.Tensor:
    """Bitmask [len(grammars), ceil(vocab_size / 32)] on CPU, row i for grammars[i]."""
    bitmask = torch.zeros((len(grammars), (vocab_size + 31) // 32), dtype=torch.int32)
    by_backend: dict[int, tuple[list[Grammar], list[int]]] = {}
    for row, grammar in enumerate(grammars):
        group = by_backend.setdefault(id(grammar.backend), ([], []))
        group[0].append(grammar)
        group[1].append(row)
    for group_grammars, rows in by_backend.values():
        group_grammars[0].backend.fill_bitmasks(group_grammars, rows, bitmask)
    return bitmask


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words -> bool [rows, vocab_size]; True = allowed."""
    bits = (bitmask.unsqueeze(-1) >> _BIT_SHIFTS) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_grammar_mask(
    logits: torch.Tensor, rows: Sequence[int], grammars: Sequence[Grammar]
) -> torch.Tensor:
    """`logits` [N, V] with the grammar rows masked; `grammars[i]` constrains row `rows[i]`.
    Returns a new tensor when it masks; the input is not modified."""
    vocab_size = logits.shape[-1]
    allowed = unpack_bitmask(fill_grammar_bitmask(grammars, vocab_size), vocab_size)
    dead_end = ~allowed.any(dim=1, keepdim=True)
    allowed = (allowed | dead_end).to(logits.device)
    if len(rows) == logits.shape[0]:
        return logits.masked_fill(~allowed, float("-inf"))
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy(0, index, masked)
