"""Verification of draft tokens: the target's distribution at every draft position decides
how many drafts are kept and which token follows them, so that the output is distributed
exactly as without speculation.

A request with drafts d_0 .. d_{k-1} has k + 1 logits rows: row i is the target's next-token
logits after the request's tokens and d_0 .. d_{i-1}. Each row goes through the sampler's
whole recipe (grammar mask, logit bias, token masks, penalties, temperature, top-k, top-p,
min-p) as if the request's tokens were followed by those drafts (the prefix penalties and
min_tokens see), giving the final distribution p_i. Then, for i = 0, 1, ...:

    greedy:   accept d_i while argmax p_i == d_i; the first mismatch emits argmax p_i, and when
              every draft is accepted the bonus token argmax p_k follows. Identical to greedy
              decoding one token at a time.
    sampled:  the proposer is deterministic (q is a point mass at d_i), so the speculative
              sampling rule min(1, p/q) becomes: accept d_i with probability p_i(d_i); on
              rejection draw from p_i with d_i removed (renormalised; the residual max(p - q, 0)
              of the general rule), and after k acceptances draw the bonus token from p_k.

Guided decoding: the mask of row i is the grammar's after d_0 .. d_{i-1}, computed by advancing
the request's matcher over the drafts and rolling it back afterwards (the scheduler advances it
for real over the accepted tokens only). A draft the grammar rejects has p_i(d_i) = 0, so it is
never accepted, and the rows after it are not needed.

Randomness: a seeded request draws from its own generator (one uniform per draft for
acceptance, drawn together, then an exponential race for a replacement or bonus token), so the
same seed gives the same output on every run; other requests share the default generator.

Cost: greedy requests whose rows need nothing but the argmax (no grammar, penalties, logit
bias or token masks: the common case) are verified together, one argmax over all their rows
and one comparison with all their drafts, with no per-token Python; the others one request at
a time as above.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from engine.core.batch import ScheduledRequest
from engine.sampling.draw import argmax_rows, exponential_race
from engine.sampling.grammar_mask import unpack_bitmask
from engine.sampling.logit_bias import needs_logit_bias
from engine.sampling.logprobs import candidates_to_full_rows
from engine.sampling.penalties import needs_penalties
from engine.sampling.sampler import adjust_logits
from engine.sampling.temperature import apply_temperature
from engine.sampling.token_masks import needs_token_masks
from engine.sampling.top_k_top_p import (
    apply_min_p,
    apply_top_k_top_p,
    needs_min_p,
    needs_top_k,
    needs_top_p,
)

GeneratorFor = Callable[[ScheduledRequest], "torch.Generator | None"]


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    num_accepted: int  # drafts kept, a prefix of the request's drafts
    token_id: int  # the target's token after them (replacement or bonus)


def verify_drafts(
    logits: torch.Tensor,
    requests: Sequence[ScheduledRequest],
    generator_for: GeneratorFor,
) -> list[Verdict]:
    """`logits` [sum(len(drafts) + 1), V]: each request's rows in order, requests in order."""
    verdicts: list[Verdict | None] = [None] * len(requests)
    plain_greedy: list[int] = []  # indices of requests verified together
    first_rows: list[int] = []
    row = 0
    vocab_size = logits.shape[-1]
    for index, request in enumerate(requests):
        num_rows = len(request.draft_token_ids) + 1
        if _needs_only_argmax(request, vocab_size):
            plain_greedy.append(index)
            first_rows.append(row)
        else:
            verdicts[index] = _verify_one(logits[row : row + num_rows], request, generator_for)
        row += num_rows
    if plain_greedy:
        batch = [requests[i] for i in plain_greedy]
        for index, verdict in zip(plain_greedy, _verify_greedy(logits, batch, first_rows)):
            verdicts[index] = verdict
    return verdicts  # type: ignore[return-value]


def _needs_only_argmax(request: ScheduledRequest, vocab_size: int) -> bool:
    params = request.sampling_params
    return (
        params.is_greedy
        and request.grammar is None
        and not needs_logit_bias(params)
        and not needs_penalties(params)
        and not needs_token_masks(request)
        and all(0 <= draft < vocab_size for draft in request.draft_token_ids)
    )


def _verify_greedy(
    logits: torch.Tensor, requests: list[ScheduledRequest], first_rows: list[int]
) -> list[Verdict]:
    """Greedy verification of several requests at once: accepted = the length of the run of
    drafts equal to the argmax of the row before them; the token after = that row's argmax
    (a replacement, or the bonus token when all were accepted).

        rows (2 requests):   a0 a1 a2 | b0 b1          argmax per row, one call
        drafts:              da0 da1  | db0            compared with rows a0 a1 | b0
        first mismatch:      accepted = min over the request's drafts of (offset if it
                             differs, else its draft count): one minimum.reduceat

    numpy rather than torch: these arrays hold a few dozen values, and right after the
    forward pass each torch call costs several times a numpy one (cold caches)."""
    num_drafts = np.fromiter((len(r.draft_token_ids) for r in requests), np.int64, len(requests))
    # Local row of each request's first row, and of each draft's predicting row.
    local_starts = np.zeros(len(requests), np.int64)
    np.cumsum(num_drafts[:-1] + 1, out=local_starts[1:])
    rows = np.concatenate([np.arange(f, f + n + 1) for f, n in zip(first_rows, num_drafts)])
    selected = logits if rows.size == logits.shape[0] else logits[torch.from_numpy(rows)]
    targets = argmax_rows(selected).numpy()
    drafts = np.fromiter(
        itertools.chain.from_iterable(r.draft_token_ids for r in requests), np.int64,
        int(num_drafts.sum()),
    )
    draft_starts = local_starts - np.arange(len(requests))  # where each request's drafts begin
    offset = np.arange(drafts.size) - np.repeat(draft_starts, num_drafts)
    predicted = targets[offset + np.repeat(local_starts, num_drafts)]
    mismatch_at = np.where(predicted != drafts, offset, np.repeat(num_drafts, num_drafts))
    accepted = np.minimum.reduceat(mismatch_at, draft_starts)
    tokens = targets[local_starts + accepted]
    return [Verdict(n, t) for n, t in zip(accepted.tolist(), tokens.tolist())]


def _verify_one(
    logits: torch.Tensor, request: ScheduledRequest, generator_for: GeneratorFor
) -> Verdict:
    params = request.sampling_params
    logits = logits.float()
    vocab_size = logits.shape[-1]
    # A draft model with a larger vocabulary may propose ids the target cannot emit.
    drafts = list(request.draft_token_ids)
    outside = next((i for i, d in enumerate(drafts) if not 0 <= d < vocab_size), None)
    if outside is not None:
        drafts, logits = drafts[:outside], logits[: outside + 1]
    if request.grammar is not None:
        logits, num_allowed = _mask_with_grammar(logits, request)
        # Positions after a draft the grammar refuses are never reached.
        logits = logits[: num_allowed + 1]
        drafts = drafts[: num_allowed + 1]
    if needs_logit_bias(params) or needs_penalties(params) or needs_token_masks(request):
        # min_tokens only ever stops applying as outputs grow: position 0 decides for all.
        positions = [_at_position(request, drafts[:i]) for i in range(logits.shape[0])]
        logits = adjust_logits(logits, positions, [params] * len(positions))
    num_rows = logits.shape[0]
    if params.is_greedy:
        targets = argmax_rows(logits).tolist()
        for i, draft in enumerate(drafts):
            if targets[i] != draft:
                return Verdict(i, targets[i])
        return _after_all_accepted(drafts, num_rows, lambda row: targets[row])
    probs = _final_probs(logits, params)
    generator = generator_for(request)
    vocab_size = probs.shape[-1]
    if drafts:
        # Accept d_i with probability p_i(d_i): all uniforms at once, the first failure wins.
        uniforms = torch.rand(len(drafts), generator=generator, device=probs.device)
        draft_ids = torch.tensor(drafts, dtype=torch.long, device=probs.device)
        draft_probs = probs[torch.arange(len(drafts), device=probs.device), draft_ids]
        rejected = (uniforms >= draft_probs).nonzero()
        if rejected.numel():
            i = int(rejected[0, 0])
            residual = probs[i : i + 1].clone()
            residual[0, drafts[i]] = 0.0
            token = exponential_race(residual, [generator], vocab_size)
            return Verdict(i, int(token[0]))
    return _after_all_accepted(
        drafts,
        num_rows,
        lambda row: int(exponential_race(probs[row : row + 1], [generator], vocab_size)[0]),
    )


def _after_all_accepted(
    drafts: list[int], num_rows: int, target_token: Callable[[int], int]
) -> Verdict:
    """Every draft was accepted: the bonus token from the row after them. When a grammar cut
    the rows, the last draft sits on the last row: it was accepted because the grammar's mask
    there allows it after all (EOS once the grammar is complete) or because that row was a
    dead end, left unmasked (the scheduler's grammar check then ends the request, as without
    speculation); either way it is the target's token and nothing follows it this step."""
    if len(drafts) < num_rows:
        return Verdict(len(drafts), target_token(len(drafts)))
    return Verdict(len(drafts) - 1, drafts[-1])


def _at_position(request: ScheduledRequest, drafts: list[int]) -> ScheduledRequest:
    """The request as the sampler would see it with `drafts` already appended."""
    if not drafts:
        return request
    return dataclasses.replace(
        request, token_ids=[*request.token_ids, *drafts], draft_token_ids=(), grammar=None
    )


def _mask_with_grammar(
    logits: torch.Tensor, request: ScheduledRequest
) -> tuple[torch.Tensor, int]:
    """Rows masked by the grammar's state at each position, and how many drafts it allows
    in a row from the first (rows past the first refused draft are left unmasked)."""
    grammar = request.grammar
    assert grammar is not None
    num_rows, vocab_size = logits.shape
    bitmask = torch.zeros((num_rows, (vocab_size + 31) // 32), dtype=torch.int32)
    drafts = request.draft_token_ids
    num_allowed = 0
    for i in range(num_rows):
        grammar.fill_bitmask(bitmask, i)
        if i == len(drafts) or grammar.is_terminated:
            break
        draft = drafts[i]
        if draft >= vocab_size or not (int(bitmask[i, draft // 32]) >> (draft % 32)) & 1:
            break
        if not grammar.accept_token(draft):
            break
        num_allowed += 1
    grammar.rollback(num_allowed)
    rows = num_allowed + 1
    allowed = unpack_bitmask(bitmask[:rows], vocab_size)
    # A dead end is left unmasked, as the sampler does; the scheduler then ends the request.
    allowed |= ~allowed.any(dim=1, keepdim=True)
    masked = logits[:rows].masked_fill(~allowed.to(logits.device), float("-inf"))
    return torch.cat([masked, logits[rows:]]), num_allowed


def _final_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """Steps 3-6 of the sampler's recipe for one request's rows: the distribution it draws
    from, as full vocabulary rows (0 for tokens cut by top-k, top-p or min-p)."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    if params.temperature != 1.0:
        logits = apply_temperature(
            logits, torch.full((num_rows,), params.temperature, device=device)
        )
    if needs_top_k(params) or needs_top_p(params):
        top_k = (
            torch.full((num_rows,), params.top_k, dtype=torch.long, device=device)
            if needs_top_k(params) else None
        )
        top_p = (
            torch.full((num_rows,), params.top_p, dtype=torch.float32, device=device)
            if needs_top_p(params) else None
        )
        candidates = apply_top_k_top_p(logits, top_k, top_p)
        candidate_logits = candidates.logits
        if needs_min_p(params):
            candidate_logits = apply_min_p(
                candidate_logits, torch.full((num_rows,), params.min_p, device=device)
            )
        logits = candidates_to_full_rows(candidate_logits, candidates.token_ids, vocab_size)
    elif needs_min_p(params):
        logits = apply_min_p(logits, torch.full((num_rows,), params.min_p, device=device))
    return torch.softmax(logits, dim=-1)
