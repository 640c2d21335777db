"""Repetition, presence and frequency penalties.

Reference semantics, per row:
  repetition_penalty r: every token seen in the prompt or the output so far has its logit
      divided by r when positive, multiplied by r when negative (r > 1 discourages repeats).
  presence_penalty p:  subtract p once from every distinct token present in the output.
  frequency_penalty f: subtract f * count(token in output).
Repetition is applied first; presence and frequency then subtract from its result.

Only the (row, token) cells that occur in a row's context change, so the work is done on those
cells alone, addressed in the flattened logits as `row * vocab_size + token_id`: the cost grows
with the number of context tokens, not with batch size times vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from engine.core.batch import ScheduledRequest
from engine.sampling_params import SamplingParams


def needs_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def apply_penalties(logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
    """Return `logits` penalised row by row; `requests[i]` belongs to row i. Input unchanged."""
    params = [r.sampling_params for r in requests]
    vocab_size = logits.shape[-1]
    prompt_cells = _context_cells(
        [r.token_ids[: r.num_prompt_tokens] for r in requests], vocab_size, logits.device
    )
    output_cells = _context_cells(
        [r.token_ids[r.num_prompt_tokens :] for r in requests], vocab_size, logits.device
    )
    penalised = logits.clone()
    flat_logits = penalised.view(-1)
    if any(p.repetition_penalty != 1.0 for p in params):
        repetition = _per_row(params, "repetition_penalty", logits)
        seen_cells = torch.unique(torch.cat([prompt_cells, output_cells]))
        seen_logits = flat_logits[seen_cells]
        row_penalties = repetition[seen_cells // vocab_size]
        flat_logits[seen_cells] = torch.where(
            seen_logits > 0, seen_logits / row_penalties, seen_logits * row_penalties
        )
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        presence = _per_row(params, "presence_penalty", logits)
        frequency = _per_row(params, "frequency_penalty", logits)
        output_cells, output_counts = torch.unique(output_cells, return_counts=True)
        rows = output_cells // vocab_size
        flat_logits[output_cells] -= presence[rows] + frequency[rows] * output_counts
    return penalised


def _context_cells(
    token_ids_per_row: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Flat cell index `row * vocab_size + token_id` of every token, one entry per occurrence.

    Token ids outside [0, vocab_size) are dropped: they have no logit to penalise.
    """
    lengths = torch.tensor([len(ids) for ids in token_ids_per_row], dtype=torch.long)
    token_ids = torch.tensor(list(chain.from_iterable(token_ids_per_row)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_ids_per_row)), lengths)
    in_vocab = (token_ids >= 0) & (token_ids < vocab_size)
    return (rows * vocab_size + token_ids)[in_vocab].to(device)


def _per_row(params: Sequence[SamplingParams], name: str, logits: torch.Tensor) -> torch.Tensor:
    return torch.tensor(
        [getattr(p, name) for p in params], dtype=logits.dtype, device=logits.device
    )
