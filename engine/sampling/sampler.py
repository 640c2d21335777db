"""The sampler: one token per batch row from float32 logits [num_rows, vocab].

Recipe, applied to the whole batch at once; each step is skipped entirely when no row needs it:

    0. grammar mask   rows with a guided-decoding grammar: only tokens it allows (greedy too)
    1. logit_bias     rows with a bias (greedy rows too: it changes their argmax)
       token masks    min_tokens, allowed_token_ids, bad_words (-inf; greedy rows too)
    2. penalties      repetition, presence, frequency (greedy rows too)
       -- greedy rows (temperature 0 or top_k 1) take the argmax here; they use no randomness --
    3. temperature    sampled rows only
    4. top_k
    5. top_p          on the distribution left by top_k
    6. min_p
    7. draw           softmax, then exponential race: argmax(p / q), q ~ Exp(1)

The final distribution, softmax of the logits after step 6, is what is sampled from and what
logprobs are reported from: `logprobs` are log_softmax of the logits after penalties, bias,
masks, temperature, top-k, top-p and min-p (tokens cut by them report -inf), and for greedy
rows log_softmax of the logits after steps 1-2. Only rows that ask for logprobs (or use
best_of, which ranks candidates by cumulative logprob) pay for them.
Steps 3-6 leave the argmax unchanged, so greedy rows skip them.
Rows with top_k or top_p continue from step 4 on a short best-first candidate list per row
(`Candidates`: zero probability outside it); the other sampled rows keep full vocabulary rows.

Randomness: rows whose request has a seed draw from their own generator, created on first sight
from the seed and kept until `free()`; it advances exactly once per sampled token, so a seeded
request produces the same tokens whatever else is in the batch, and across preemption. All
other rows share one batched draw from the default generator.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from engine.core.batch import ScheduledRequest
from engine.core.outputs import TokenLogprobs
from engine.sampling.draw import exponential_race, greedy, greedy_token_ids, make_generator
from engine.sampling.grammar_mask import apply_grammar_mask

from engine.sampling.logprobs import (
    candidates_to_full_rows,
    compute_token_logprobs,
    needs_logprobs,
    num_top_logprobs,
)
from engine.sampling.logit_bias import apply_logit_bias, needs_logit_bias
from engine.sampling.penalties import apply_penalties, needs_penalties
from engine.sampling.temperature import apply_temperature
from engine.sampling.token_masks import apply_token_masks, needs_token_masks
from engine.sampling.top_k_top_p import (
    Candidates,
    apply_min_p,
    apply_top_k_top_p,
    needs_min_p,
    needs_top_k,
    needs_top_p,
)
from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]
    # Per row; None for rows that did not ask (the whole list None when no row asked).
    logprobs: list[TokenLogprobs | None] | None = None


class Sampler:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._device = torch.device(device)
        # request_id -> generator of a seeded request, alive from its first sampled token
        # until free(); preempted requests keep theirs so they resume the same sequence.
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: list[ScheduledRequest]) -> list[int]:
        """One token id per row; row i of `logits` [N, V] belongs to `requests[i]`."""
        return self.sample_with_logprobs(logits, requests).token_ids

    def sample_with_logprobs(
        self, logits: torch.Tensor, requests: list[ScheduledRequest]
    ) -> SamplerOutput:
        """Token ids, plus logprobs of the final distribution for the rows that ask."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(requests)} requests"
            )
        if all(_is_plain_greedy(request) for request in requests):
            # The common all-greedy batch: one pass over the requests, then the argmax of
            # the logits as they are (no float32 copy, no per-row bookkeeping).
            return SamplerOutput(greedy_token_ids(logits))
        params = [r.sampling_params for r in requests]
        sampled_rows = [row for row, p in enumerate(params) if not p.is_greedy]
        wants_logprobs = any(needs_logprobs(p) for p in params)
        needs_adjusting = any(needs_logit_bias(p) or needs_penalties(p) for p in params) or any(
            needs_token_masks(r) for r in requests
        )
        grammar_rows = [row for row, r in enumerate(requests) if r.grammar is not None]
        if not sampled_rows and not needs_adjusting and not wants_logprobs and not grammar_rows:
            return SamplerOutput(greedy(logits).tolist())
        logits = logits.to(device=self._device, dtype=torch.float32)
        if grammar_rows:
            grammars = [requests[row].grammar for row in grammar_rows]
            logits = apply_grammar_mask(logits, grammar_rows, grammars)  # type: ignore[arg-type]
        if needs_adjusting:
            logits = adjust_logits(logits, requests, params)
        step = _StepResult(len(requests), logits.shape[-1], self._device, wants_logprobs)
        greedy_rows = [row for row, p in enumerate(params) if p.is_greedy]
        if greedy_rows:
            greedy_logits = _rows(logits, greedy_rows)
            step.record(greedy_rows, greedy(greedy_logits), greedy_logits, params)
        if sampled_rows:
            self._sample_rows(_rows(logits, sampled_rows), sampled_rows, requests, step)
        return step.output()

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
        rows: list[int],
        requests: Sequence[ScheduledRequest],
        step: _StepResult,
    ) -> None:
        """Draw for non-greedy rows (`rows` of the batch, in `logits` order): steps 3-7."""
        params = [requests[row].sampling_params for row in rows]
        if any(p.temperature != 1.0 for p in params):
            temperatures = torch.tensor([p.temperature for p in params], device=self._device)
            logits = apply_temperature(logits, temperatures)
        generators = [self.generator_for(requests[row]) for row in rows]
        is_truncated = [needs_top_k(p) or needs_top_p(p) for p in params]
        all_params = [r.sampling_params for r in requests]
        for draw, truncated in ((_draw_candidates, True), (_draw_full_rows, False)):
            group = [i for i, flag in enumerate(is_truncated) if flag == truncated]
            if not group:
                continue
            token_ids, final_logits = draw(
                _rows(logits, group),
                [params[i] for i in group],
                [generators[i] for i in group],
            )
            step.record([rows[i] for i in group], token_ids, final_logits, all_params)

    def generator_for(self, request: ScheduledRequest) -> torch.Generator | None:
        """The seeded request's own generator (None when unseeded); draft verification
        (engine.spec_decode.rejection) draws from the same one."""
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = make_generator(seed, self._device)
            self._generators[request.request_id] = generator
        return generator


def _is_plain_greedy(request: ScheduledRequest) -> bool:
    """Greedy on the raw logits: no grammar, logit bias, token masks, penalties or logprobs."""
    params = request.sampling_params
    return (
        params.is_greedy
        and request.grammar is None
        and not needs_logprobs(params)
        and not needs_logit_bias(params)
        and not needs_penalties(params)
        and not needs_token_masks(request)
    )


def adjust_logits(
    logits: torch.Tensor, requests: Sequence[ScheduledRequest], params: Sequence[SamplingParams]
) -> torch.Tensor:
    """Steps 1-2: logit bias, token bans and penalties, on every row that asks for them."""
    if any(needs_logit_bias(p) for p in params):
        logits = apply_logit_bias(logits, params)
    masked_rows = [row for row, r in enumerate(requests) if needs_token_masks(r)]
    if masked_rows:
        masked = apply_token_masks(
            _rows(logits, masked_rows), [requests[row] for row in masked_rows]
        )
        logits = _put_rows(logits, masked_rows, masked)
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
) -> tuple[torch.Tensor, Candidates]:
    """Steps 4-7 for rows of which some have top_k or top_p: work on per-row candidates."""
    device = logits.device
    top_k = top_p = None
    if any(needs_top_k(p) for p in params):
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    if any(needs_top_p(p) for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    candidates = apply_top_k_top_p(logits, top_k, top_p)
    final = Candidates(_apply_min_p_if_needed(candidates.logits, params), candidates.token_ids)
    probs = torch.softmax(final.logits, dim=-1)
    return exponential_race(probs, generators, logits.shape[-1], final.token_ids), final


def _draw_full_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 6-7 for rows without top_k and top_p: work on full vocabulary rows."""
    final = _apply_min_p_if_needed(logits, params)
    probs = torch.softmax(final, dim=-1)
    return exponential_race(probs, generators, logits.shape[-1]), final


def _apply_min_p_if_needed(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    if not any(needs_min_p(p) for p in params):
        return logits
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=logits.device)
    return apply_min_p(logits, min_p)


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The given rows, without a copy when they are all rows in order."""
    if rows == list(range(logits.shape[0])):
        return logits
    return logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))


def _put_rows(logits: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    if rows == list(range(logits.shape[0])):
        return values
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    return logits.index_copy(0, index, values)


class _StepResult:
    """Collects token ids (and logprobs, for rows that ask) from the greedy and sampled groups
    of one step, each group reported with its own final logits."""

    def __init__(
        self, num_rows: int, vocab_size: int, device: torch.device, wants_logprobs: bool
    ) -> None:
        self._vocab_size = vocab_size
        self._token_ids = torch.empty(num_rows, dtype=torch.long, device=device)
        self._logprobs: list[TokenLogprobs | None] | None = (
            [None] * num_rows if wants_logprobs else None
        )

    def record(
        self,
        rows: list[int],
        token_ids: torch.Tensor,
        final_logits: torch.Tensor | Candidates,
        params: Sequence[SamplingParams],
    ) -> None:
        """`rows` of the batch took `token_ids` from `final_logits` (same order)."""
        self._token_ids[torch.tensor(rows, dtype=torch.long, device=token_ids.device)] = token_ids
        if self._logprobs is None:
            return
        wanted = [i for i, row in enumerate(rows) if needs_logprobs(params[row])]
        if not wanted:
            return
        index = torch.tensor(wanted, dtype=torch.long, device=token_ids.device)
        if isinstance(final_logits, Candidates):
            full = candidates_to_full_rows(
                final_logits.logits.index_select(0, index),
                final_logits.token_ids.index_select(0, index),
                self._vocab_size,
            )
        else:
            full = final_logits.index_select(0, index)
        entries = compute_token_logprobs(
            full,
            token_ids.index_select(0, index),
            [num_top_logprobs(params[rows[i]]) for i in wanted],
        )
        for i, entry in zip(wanted, entries):
            self._logprobs[rows[i]] = entry

    def output(self) -> SamplerOutput:
        return SamplerOutput(self._token_ids.tolist(), self._logprobs)
