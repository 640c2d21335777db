"""Log-probabilities of the final distribution: the chosen token's logprob and rank, and the
top-N alternatives, for the rows that asked (`logprobs`, or `best_of`, which ranks candidates
by cumulative logprob).

The caller passes each row's final logits: full vocabulary rows, or candidate rows
(`Candidates`) expanded here to full rows with -inf outside the candidates, so a log_softmax
gives the distribution the token was actually drawn from.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.core.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams


def needs_logprobs(params: SamplingParams) -> bool:
    return params.logprobs is not None or (
        params.best_of is not None and params.best_of > params.n
    )


def num_top_logprobs(params: SamplingParams) -> int:
    return params.logprobs or 0


def candidates_to_full_rows(
    candidate_logits: torch.Tensor, candidate_token_ids: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """[rows, vocab] logits: the candidates' values, -inf for every other token."""
    full = torch.full(
        (candidate_logits.shape[0], vocab_size), -math.inf,
        dtype=candidate_logits.dtype, device=candidate_logits.device,
    )
    return full.scatter(-1, candidate_token_ids, candidate_logits)


def compute_token_logprobs(
    final_logits: torch.Tensor, chosen_token_ids: torch.Tensor, num_top: Sequence[int]
) -> list[TokenLogprobs]:
    """One entry per row of `final_logits` [rows, vocab]; row i reports `num_top[i]` top tokens.

    Rank counts the tokens strictly more likely than the chosen one, plus one.
    """
    log_probs = torch.log_softmax(final_logits.float(), dim=-1)
    chosen = chosen_token_ids.to(device=log_probs.device, dtype=torch.long).unsqueeze(-1)
    chosen_log_probs = log_probs.gather(-1, chosen)
    ranks = (log_probs > chosen_log_probs).sum(dim=-1) + 1
    max_top = min(max(num_top, default=0), log_probs.shape[-1])
    top_ids: list[list[int]] = [[] for _ in num_top]
    top_values: list[list[float]] = [[] for _ in num_top]
    if max_top > 0:
        values, ids = log_probs.topk(max_top, dim=-1)
        top_ids, top_values = ids.tolist(), values.tolist()
    return [
        TokenLogprobs(
            token_id=token_id,
            logprob=logprob,
            rank=rank,
            top_token_ids=top_ids[row][:count],
            top_logprobs=top_values[row][:count],
        )
        for row, (token_id, logprob, rank, count) in enumerate(
            zip(
                chosen.squeeze(-1).tolist(),
                chosen_log_probs.squeeze(-1).tolist(),
                ranks.tolist(),
                num_top,
            )
        )
    ]
