"""The runner's sampling step when some requests carry draft tokens: one vocabulary
projection for every row that needs logits (each plain request's last row, every row of each
request with drafts), then the sampler for plain requests and the verifier for the others.

    rows of the forward:   [ ... A(last) ... | B(newest) B(d0) B(d1) | ... ]
    logits:                [ plain rows (sample order) | draft rows (request by request) ]
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from engine.core.batch import ScheduledRequest
from engine.core.outputs import ModelRunnerOutput, TokenLogprobs
from engine.sampling.sampler import Sampler
from engine.spec_decode.rejection import verify_drafts


def has_drafts(requests: list[ScheduledRequest]) -> bool:
    return any(request.draft_token_ids for request in requests)


def sample_with_drafts(
    sampler: Sampler,
    hidden: torch.Tensor,
    sample_requests: list[ScheduledRequest],
    last_rows: list[int],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
) -> ModelRunnerOutput:
    """`last_rows[i]`: the flattened row of `sample_requests[i]`'s last computed token (its
    newest token, or its last draft)."""
    plain: list[int] = []  # indices into sample_requests
    speculative: list[int] = []
    plain_rows: list[int] = []
    draft_rows: list[int] = []
    for i, (request, last) in enumerate(zip(sample_requests, last_rows)):
        num_drafts = len(request.draft_token_ids)
        if num_drafts:
            speculative.append(i)
            draft_rows.extend(range(last - num_drafts, last + 1))
        else:
            plain.append(i)
            plain_rows.append(last)
    index = torch.tensor(plain_rows + draft_rows, dtype=torch.long, device=hidden.device)
    logits = compute_logits(hidden.index_select(0, index))
    token_ids: list[int] = [0] * len(sample_requests)
    logprobs: list[TokenLogprobs | None] | None = None
    if plain:
        sampled = sampler.sample_with_logprobs(
            logits[: len(plain)], [sample_requests[i] for i in plain]
        )
        for i, token_id in zip(plain, sampled.token_ids):
            token_ids[i] = token_id
        if sampled.logprobs is not None:
            logprobs = [None] * len(sample_requests)
            for i, entry in zip(plain, sampled.logprobs):
                logprobs[i] = entry
    verdicts = verify_drafts(
        logits[len(plain) :], [sample_requests[i] for i in speculative], sampler.generator_for
    )
    num_accepted: dict[str, int] = {}
    for i, verdict in zip(speculative, verdicts):
        token_ids[i] = verdict.token_id
        num_accepted[sample_requests[i].request_id] = verdict.num_accepted
    return ModelRunnerOutput(
        request_ids=[request.request_id for request in sample_requests],
        sampled_token_ids=token_ids,
        logprobs=logprobs,
        num_accepted_drafts=num_accepted,
    )
