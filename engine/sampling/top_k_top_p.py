"""Truncation of the candidate set: top-k, then top-p (nucleus), then min-p.

top_k and top_p leave each row a short list of candidates, best first, instead of a full
vocabulary row: later steps (min_p, softmax, the draw) then touch [num_rows, num_candidates]
rather than [num_rows, vocab]. Removed candidates get logit -inf (probability 0).

How many candidates a row needs, without sorting the vocabulary:
  - top_k = k: its k best tokens.
  - no top_k, top_p = p < 1: first try a few dozen best tokens, enough whenever they already
    hold mass >= p (a peaked distribution). Otherwise every token of probability >= (1 - p) / V:
    a token below that bound is never in the nucleus, since all such tokens together hold less
    than 1 - p, so the tokens ranked above the first of them already hold more than p.
  - neither: the whole vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

# Candidates first tried for rows without top_k: a peaked distribution's nucleus fits.
_FIRST_NUM_CANDIDATES = 64


def needs_top_k(params: SamplingParams) -> bool:
    return params.top_k > 0


def needs_top_p(params: SamplingParams) -> bool:
    return params.top_p < 1.0


def needs_min_p(params: SamplingParams) -> bool:
    return params.min_p > 0.0


@dataclass(frozen=True, slots=True)
class Candidates:
    """The tokens each row may still sample, best first.

    `logits[i, j]` is the logit of token `token_ids[i, j]` up to a per-row constant; -inf marks a
    removed candidate. Invariant: every token outside a row's candidates has probability 0, so
    softmax over `logits` is the row's distribution over `token_ids`.
    """

    logits: torch.Tensor  # float [num_rows, num_candidates]
    token_ids: torch.Tensor  # int64 [num_rows, num_candidates]


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> Candidates:
    """Keep row i's `top_k[i]` best tokens (0: all), then its smallest prefix of mass >= `top_p[i]`.

    top_p is measured on the distribution left after top_k (renormalised); the best token is
    always kept; `None` disables a transform for every row. Masks are by rank, so top_k keeps
    exactly k tokens even when logits tie. The input is not modified.
    """
    num_rows, vocab_size = logits.shape
    device = logits.device
    has_top_k = top_k > 0 if top_k is not None else torch.zeros(num_rows, dtype=torch.bool)
    has_top_k = has_top_k.to(device)
    if top_k is not None and bool(has_top_k.all()):
        candidate_logits, token_ids = logits.topk(min(int(top_k.max()), vocab_size), dim=-1)
    else:
        # Rows without top_k may keep only part of a full-vocabulary distribution, so their
        # top_p mass must be measured against the full softmax: work in log-probabilities.
        candidate_logits, token_ids = _best_log_prob_candidates(
            torch.log_softmax(logits, dim=-1), top_k, top_p, has_top_k
        )
    num_candidates = token_ids.shape[-1]
    if top_k is not None:
        ranks = torch.arange(num_candidates, device=device)
        # Rows without top_k get a limit of the full vocabulary: nothing removed.
        row_limits = torch.where(has_top_k, top_k, vocab_size).unsqueeze(-1)
        candidate_logits = candidate_logits.masked_fill(ranks >= row_limits, -math.inf)
    if top_p is not None:
        candidate_logits = _mask_top_p(candidate_logits, has_top_k, top_p)
    return Candidates(logits=candidate_logits, token_ids=token_ids)


def _best_log_prob_candidates(
    log_probs: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    has_top_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first (log-probs, token ids) covering every row's support after top_k and top_p."""
    vocab_size = log_probs.shape[-1]
    max_top_k = int(top_k.max()) if top_k is not None else 0
    first_try = min(max(_FIRST_NUM_CANDIDATES, max_top_k), vocab_size)
    candidate_log_probs, token_ids = log_probs.topk(first_try, dim=-1)
    if first_try == vocab_size or (
        top_p is not None and _holds_nucleus(candidate_log_probs, has_top_k, top_p)
    ):
        return candidate_log_probs, token_ids
    return log_probs.topk(_num_candidates(log_probs, top_k, top_p, has_top_k), dim=-1)


def _holds_nucleus(
    candidate_log_probs: torch.Tensor, has_top_k: torch.Tensor, top_p: torch.Tensor
) -> bool:
    """Whether every row without top_k has a top_p < 1 that its candidates' mass reaches.

    Rows with top_k always fit: the caller tries at least max(top_k) candidates. The margin keeps
    float rounding in the later cumulative sum from wanting one candidate more.
    """
    mass = candidate_log_probs.logsumexp(dim=-1).exp()
    return bool((has_top_k | ((top_p < 1.0) & (mass >= top_p + 1e-5))).all())


def _num_candidates(
    log_probs: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    has_top_k: torch.Tensor,
) -> int:
    """The most candidates any row needs (module docstring), from full-row log-probs."""
    vocab_size = log_probs.shape[-1]
    needed = torch.full_like(has_top_k, vocab_size, dtype=torch.long)
    if top_k is not None:
        needed = torch.where(has_top_k, top_k, needed)
    if top_p is not None:
        # Half the proven bound, so float rounding in the cumulative sums cannot matter.
        min_log_prob = torch.log((1.0 - top_p) / (2 * vocab_size)).unsqueeze(-1)
        num_likely = (log_probs >= min_log_prob).sum(dim=-1)
        needed = torch.where(~has_top_k & (top_p < 1.0), num_likely, needed)
    return max(1, min(int(needed.max()), vocab_size))


def _mask_top_p(
    candidate_logits: torch.Tensor, has_top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Remove candidates after the smallest best-first prefix reaching mass top_p."""
    # Rows with top_k hold their whole remaining support: renormalise over it. Rows without
    # top_k hold full-vocabulary log-probs already (see apply_top_k_top_p).
    log_normalisers = torch.where(
        has_top_k, candidate_logits.logsumexp(dim=-1), torch.zeros_like(top_p)
    )
    probs = torch.exp(candidate_logits - log_normalisers.unsqueeze(-1))
    # Mass of the strictly better candidates: a token is kept while that mass is < p, which
    # keeps the smallest prefix reaching p. Rows with p == 1 are exempt, so rounding in the
    # cumulative sum cannot trim their tail.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove = (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1.0).unsqueeze(-1)
    remove[:, 0] = False
    return candidate_logits.masked_fill(remove, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Remove tokens whose probability is below `min_p[i]` times the row's top probability.

    p_j < m * p_max  <=>  logit_j < logit_max + log(m), since both probabilities share the
    softmax normaliser; so no softmax is needed. m == 0 gives a threshold of -inf (no-op).
    Works on full rows and on candidate rows alike.
    """
    thresholds = logits.max(dim=-1, keepdim=True).values + torch.log(min_p).unsqueeze(-1)
    return logits.masked_fill(logits < thresholds, -math.inf)
