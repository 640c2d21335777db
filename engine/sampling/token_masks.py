"""Hard token bans: min_tokens, allowed_token_ids and bad_words set logits to -inf.

A banned token has probability 0 in every later step of the recipe, greedy rows included, so
these run before the greedy split. Each transform gathers the banned (row, token) cells of the
rows that ask and writes -inf into all of them with one `index_put`; rows that do not ask cost
nothing.

  min_tokens:         while a row has fewer than min_tokens outputs, its stop_token_ids and
                      (unless ignore_eos, where EOS cannot end the request anyway) its EOS ids.
  allowed_token_ids:  every token not in the list.
  bad_words:          the last token of each bad word whose preceding tokens equal the end of
                      the output so far; a one-token word is always banned.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.core.batch import ScheduledRequest
from engine.sampling_params import SamplingParams


def needs_min_tokens(request: ScheduledRequest) -> bool:
    params = request.sampling_params
    return params.min_tokens > 0 and request.num_output_tokens < params.min_tokens


def needs_token_masks(request: ScheduledRequest) -> bool:
    params = request.sampling_params
    return (
        needs_min_tokens(request)
        or params.allowed_token_ids is not None
        or bool(params.bad_words_token_ids)
    )


def apply_token_masks(logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
    """Return `logits` with every banned cell at -inf; `requests[i]` belongs to row i."""
    vocab_size = logits.shape[-1]
    rows: list[int] = []
    token_ids: list[int] = []
    for row, request in enumerate(requests):
        banned = _banned_tokens(request)
        rows.extend([row] * len(banned))
        token_ids.extend(banned)
    logits = _ban_cells(logits, rows, token_ids, vocab_size)
    allowed_rows = [
        row for row, r in enumerate(requests) if r.sampling_params.allowed_token_ids is not None
    ]
    if allowed_rows:
        logits = _keep_only_allowed(
            logits, allowed_rows, [requests[row].sampling_params for row in allowed_rows]
        )
    return logits


def _banned_tokens(request: ScheduledRequest) -> list[int]:
    params = request.sampling_params
    banned: list[int] = []
    if needs_min_tokens(request):
        banned.extend(params.stop_token_ids)
        if not params.ignore_eos:
            banned.extend(request.eos_token_ids)
    if params.bad_words_token_ids:
        banned.extend(_bad_word_endings(params.bad_words_token_ids, request))
    return banned


def _bad_word_endings(
    bad_words: Sequence[Sequence[int]], request: ScheduledRequest
) -> list[int]:
    """The last token of every bad word that the next token would complete."""
    output = request.token_ids[request.num_prompt_tokens :]
    endings = []
    for word in bad_words:
        prefix_len = len(word) - 1
        if prefix_len == 0 or (
            prefix_len <= len(output) and list(output[len(output) - prefix_len :]) == list(word[:-1])
        ):
            endings.append(word[-1])
    return endings


def _ban_cells(
    logits: torch.Tensor, rows: list[int], token_ids: list[int], vocab_size: int
) -> torch.Tensor:
    cells = [(r, t) for r, t in zip(rows, token_ids) if 0 <= t < vocab_size]
    if not cells:
        return logits
    device = logits.device
    index = (
        torch.tensor([r for r, _ in cells], dtype=torch.long, device=device),
        torch.tensor([t for _, t in cells], dtype=torch.long, device=device),
    )
    return logits.index_put(index, torch.tensor(-math.inf, dtype=logits.dtype, device=device))


def _keep_only_allowed(
    logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams]
) -> torch.Tensor:
    vocab_size = logits.shape[-1]
    device = logits.device
    allowed = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    mask_rows: list[int] = []
    mask_tokens: list[int] = []
    for i, row_params in enumerate(params):
        ids = [t for t in row_params.allowed_token_ids or () if 0 <= t < vocab_size]
        mask_rows.extend([i] * len(ids))
        mask_tokens.extend(ids)
    allowed[
        torch.tensor(mask_rows, dtype=torch.long, device=device),
        torch.tensor(mask_tokens, dtype=torch.long, device=device),
    ] = True
    index = torch.tensor(rows, dtype=torch.long, device=device)
    masked = logits.index_select(0, index).masked_fill(~allowed, -math.inf)
    return logits.index_copy(0, index, masked)
