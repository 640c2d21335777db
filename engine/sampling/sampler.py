"""The sampler: one token per batch row from float32 logits [num_rows, vocab].

Recipe, applied to the whole batch at once; each step is skipped entirely when no row needs it:

    1. logit_bias     rows with a bias (greedy rows too: it changes their argmax)
    2. penalties      repetition, presence, frequency (greedy rows too)
       -- greedy rows (temperature 0 or top_k 1) take the argmax here; they use no randomness --
    3. temperature    sampled rows only
    4. top_k
    5. top_p          on the distribution left by top_k
    6. min_p
    7. draw           softmax, then exponential race: argmax(p / q), q ~ Exp(1)

The final distribution, softmax of the logits after step 6, is what is sampled from and what
logprobs are reported from. Steps 3-6 leave the argmax unchanged, so greedy rows skip them.
Rows with top_k or top_p continue from step 4 on a short best-first candidate list per row
(`Candidates`: zero probability outside it); the other sampled rows keep full vocabulary rows.

Randomness: rows whose request has a seed draw from their own generator, created on first sight
from the seed and kept until `free()`; it advances exactly once per sampled token, so a seeded
request produces the same tokens whatever else is in the batch, and across preemption. All
other rows share one batched draw from the default generator.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from engine.batch import ScheduledRequest
from engine.sampling.draw import exponential_race, greedy, make_generator
from engine.sampling.logit_bias import apply_logit_bias, needs_logit_bias
from engine.sampling.penalties import apply_penalties, needs_penalties
from engine.sampling.temperature import apply_temperature
from engine.sampling.top_k_top_p import (
    apply_min_p,
    apply_top_k_top_p,
    needs_min_p,
    needs_top_k,
    needs_top_p,
)
from engine.sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._device = torch.device(device)
        # request_id -> generator of a seeded request, alive from its first sampled token
        # until free(); preempted requests keep theirs so they resume the same sequence.
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: list[ScheduledRequest]) -> list[int]:
        """One token id per row; row i of `logits` [N, V] belongs to `requests[i]`."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(requests)} requests"
            )
        params = [r.sampling_params for r in requests]
        sampled_rows = [row for row, p in enumerate(params) if not p.is_greedy]
        needs_adjusting = any(needs_logit_bias(p) or needs_penalties(p) for p in params)
        if not sampled_rows and not needs_adjusting:
            return greedy(logits).tolist()
        logits = logits.to(device=self._device, dtype=torch.float32)
        if needs_adjusting:
            logits = _adjust(logits, requests, params)
        if len(sampled_rows) == len(requests):
            return self._sample_rows(logits, requests, params).tolist()
        if not sampled_rows:
            return greedy(logits).tolist()
        greedy_rows = [row for row, p in enumerate(params) if p.is_greedy]
        greedy_index = torch.tensor(greedy_rows, dtype=torch.long, device=self._device)
        sampled_index = torch.tensor(sampled_rows, dtype=torch.long, device=self._device)
        token_ids = torch.empty(len(requests), dtype=torch.long, device=self._device)
        token_ids[greedy_index] = greedy(logits.index_select(0, greedy_index))
        token_ids[sampled_index] = self._sample_rows(
            logits.index_select(0, sampled_index),
            [requests[row] for row in sampled_rows],
            [params[row] for row in sampled_rows],
        )
        return token_ids.tolist()

    def free(self, request_ids: Iterable[str]) -> None:
        """Forget the seeded generators of finished requests; unknown ids are ignored."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    @property
    def num_seeded_requests(self) -> int:
        """How many requests currently hold a seeded generator."""
        return len(self._generators)

    def _sample_rows(
        self,
        logits: torch.Tensor,
        requests: Sequence[ScheduledRequest],
        params: Sequence[SamplingParams],
    ) -> torch.Tensor:
        """Draw for non-greedy rows: steps 3-7 of the recipe."""
        if any(p.temperature != 1.0 for p in params):
            temperatures = torch.tensor([p.temperature for p in params], device=self._device)
            logits = apply_temperature(logits, temperatures)
        generators = [self._generator_for(r) for r in requests]
        is_truncated = [needs_top_k(p) or needs_top_p(p) for p in params]
        if all(is_truncated):
            return _draw_candidates(logits, params, generators)
        if not any(is_truncated):
            return _draw_full_rows(logits, params, generators)
        token_ids = torch.empty(len(params), dtype=torch.long, device=self._device)
        for draw, truncated in ((_draw_candidates, True), (_draw_full_rows, False)):
            rows = [row for row, flag in enumerate(is_truncated) if flag == truncated]
            index = torch.tensor(rows, dtype=torch.long, device=self._device)
            token_ids[index] = draw(
                logits.index_select(0, index),
                [params[row] for row in rows],
                [generators[row] for row in rows],
            )
        return token_ids

    def _generator_for(self, request: ScheduledRequest) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = make_generator(seed, self._device)
            self._generators[request.request_id] = generator
        return generator


def _adjust(
    logits: torch.Tensor, requests: Sequence[ScheduledRequest], params: Sequence[SamplingParams]
) -> torch.Tensor:
    """Steps 1-2: logit bias and penalties, on every row that asks for them."""
    if any(needs_logit_bias(p) for p in params):
        logits = apply_logit_bias(logits, params)
    penalised_rows = [row for row, p in enumerate(params) if needs_penalties(p)]
    if len(penalised_rows) == len(requests):
        logits = apply_penalties(logits, requests)
    elif penalised_rows:
        index = torch.tensor(penalised_rows, dtype=torch.long, device=logits.device)
        penalised = apply_penalties(
            logits.index_select(0, index), [requests[row] for row in penalised_rows]
        )
        logits = logits.index_copy(0, index, penalised)
    return logits


def _draw_candidates(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Steps 4-7 for rows of which some have top_k or top_p: work on per-row candidates."""
    device = logits.device
    top_k = top_p = None
    if any(needs_top_k(p) for p in params):
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    if any(needs_top_p(p) for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    candidates = apply_top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(_apply_min_p_if_needed(candidates.logits, params), dim=-1)
    return exponential_race(probs, generators, logits.shape[-1], candidates.token_ids)


def _draw_full_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Steps 6-7 for rows without top_k and top_p: work on full vocabulary rows."""
    probs = torch.softmax(_apply_min_p_if_needed(logits, params), dim=-1)
    return exponential_race(probs, generators, logits.shape[-1])


def _apply_min_p_if_needed(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    if not any(needs_min_p(p) for p in params):
        return logits
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=logits.device)
    return apply_min_p(logits, min_p)
