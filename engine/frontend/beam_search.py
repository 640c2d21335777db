"""Beam search (`use_beam_search`): the search itself, independent of how a step is run.

It reproduces Hugging Face transformers' `generate(num_beams=width, do_sample=False,
length_penalty=..., early_stopping=...)` for decoder-only models (transformers 5.x semantics):

    per step, over every live beam b and token t:
        score(b + t) = cumulative_logprob(b) + log_softmax(logits(b))[t]
    K = max(2, 1 + number of stop tokens) * width   best of all (b, t), best first
        - a candidate ending in a stop token (EOS / stop_token_ids), or any candidate at
          max_tokens, is finished: it becomes a hypothesis only if its rank is < width,
          scored cumulative_logprob / num_output_tokens ** length_penalty (the stop token
          counts); the `width` best hypotheses are kept
        - the `width` best unfinished candidates are the next live beams
    stop when max_tokens is reached, or when `width` hypotheses exist and
        early_stopping=True:    at once
        early_stopping=False:   (transformers' default, what the servers use) the best live beam
                                could not beat the worst hypothesis even at today's length:
                                best_live / num_generated ** lp <= worst_hypothesis
        early_stopping="never": the same test at max_tokens' length when lp > 0
    the n best hypotheses are the answer, best first.

Log-probabilities are the model's own log-softmax: no temperature, penalty, bias or truncation,
which is why `check_beam_search_params` refuses the sampling fields that would change them.
Ties between equal scores go to the earlier beam, then to the expansion's order (best first).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

EarlyStopping = bool | str  # True, False or "never", as transformers spells it


@dataclass(frozen=True, slots=True)
class BeamCandidate:
    token_id: int
    # The model's log-softmax of this token after the beam's tokens.
    logprob: float


@dataclass(frozen=True, slots=True)
class Beam:
    token_ids: tuple[int, ...] = ()
    cumulative_logprob: float = 0.0
    # Per token, what the expansion reported with it (kept to rebuild logprobs at the end).
    details: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Hypothesis:
    beam: Beam
    # cumulative_logprob / len(token_ids) ** length_penalty
    score: float
    # The stop token that finished it; None when it ran to max_tokens on another token.
    stop_token_id: int | None


class BeamSearch:
    """One prompt's search. Call `step` with the expansions of `live` until `done`."""

    def __init__(
        self,
        width: int,
        max_tokens: int,
        stop_token_ids: frozenset[int],
        length_penalty: float = 1.0,
        early_stopping: EarlyStopping = False,
    ) -> None:
        if width < 1 or max_tokens < 1:
            raise ValueError(f"width ({width}) and max_tokens ({max_tokens}) must be >= 1")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        self.width = width
        self.max_tokens = max_tokens
        self.stop_token_ids = stop_token_ids
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.live: list[Beam] = [Beam()]
        # Best first, at most `width`.
        self.finished: list[Hypothesis] = []
        self.num_generated = 0
        self.done = False

    @property
    def num_candidates(self) -> int:
        """K: candidates ranked per step; also how many top tokens each expansion must report
        (every one of the K best (beam, token) pairs is among its own beam's K best tokens)."""
        return max(2, 1 + len(self.stop_token_ids)) * self.width

    def step(
        self, expansions: Sequence[Sequence[BeamCandidate]], details: Sequence[object] | None = None
    ) -> None:
        """`expansions[i]`: the best tokens after `live[i]`, best first (at least
        `num_candidates`, or the whole vocabulary); `details[i]` is stored with each of them."""
        if self.done:
            raise RuntimeError("the beam search is already done")
        if len(expansions) != len(self.live):
            raise ValueError(f"{len(expansions)} expansions for {len(self.live)} live beams")
        ranked = sorted(
            (
                (beam.cumulative_logprob + candidate.logprob, i, candidate)
                for i, (beam, candidates) in enumerate(zip(self.live, expansions))
                for candidate in candidates
            ),
            key=lambda entry: -entry[0],  # stable: beam order, then expansion order
        )[: self.num_candidates]
        length = self.num_generated + 1
        at_max_tokens = length >= self.max_tokens
        next_live: list[Beam] = []
        new_hypotheses: list[Hypothesis] = []
        for rank, (score, i, candidate) in enumerate(ranked):
            parent = self.live[i]
            beam = Beam(
                parent.token_ids + (candidate.token_id,),
                score,
                parent.details + ((details[i] if details is not None else None),),
            )
            is_stop = candidate.token_id in self.stop_token_ids
            if is_stop or at_max_tokens:
                # Only the top `width` may finish; the rest of K only keeps enough beams alive.
                if rank < self.width:
                    new_hypotheses.append(Hypothesis(
                        beam, score / length**self.length_penalty,
                        candidate.token_id if is_stop else None,
                    ))
            elif len(next_live) < self.width:
                next_live.append(beam)
        # Stable: on equal scores an older hypothesis stays ahead.
        merged = sorted(self.finished + new_hypotheses, key=lambda h: -h.score)
        self.finished = merged[: self.width]
        self.live = next_live
        self.num_generated = length
        self.done = at_max_tokens or not next_live or self._cannot_improve()

    def _cannot_improve(self) -> bool:
        if len(self.finished) < self.width:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_tokens
        else:
            best_length = self.num_generated
        best_possible = self.live[0].cumulative_logprob / best_length**self.length_penalty
        return best_possible <= self.finished[-1].score

    def best(self, n: int) -> list[Hypothesis]:
        return self.finished[:n]


def beam_width(params: SamplingParams) -> int:
    """Beams kept per step: best_of when given, else n."""
    return params.best_of or params.n


def beam_stop_token_ids(params: SamplingParams, eos_token_ids: frozenset[int]) -> frozenset[int]:
    """Tokens that finish a beam: EOS (unless ignore_eos) and stop_token_ids."""
    eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
    return eos | frozenset(params.stop_token_ids)


# Fields that would change the log-probabilities beams are ranked by, or that need text.
_UNSUPPORTED_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("presence_penalty", 0.0),
    ("frequency_penalty", 0.0), ("repetition_penalty", 1.0), ("min_tokens", 0),
    ("stop", ()), ("bad_words", ()), ("allowed_token_ids", None),
)


def check_beam_search_params(params: SamplingParams) -> None:
    """Raise InvalidRequestError naming the first field beam search cannot honour.

    temperature must be 0 (servers read an unset temperature as 0 for beam search): beams
    are ranked by the model's own log-probabilities, so a temperature would be ignored, and a
    silently ignored parameter is worse than a clear error. `params` were validated where
    they entered the engine (gRPC conversion, or the offline LLM)."""
    if params.temperature != 0.0:
        raise InvalidRequestError(
            f"temperature must be 0 with use_beam_search, got {params.temperature}",
            field="temperature",
        )
    for name, default in _UNSUPPORTED_DEFAULTS:
        if getattr(params, name) != default:
            raise InvalidRequestError(f"{name} is not supported with use_beam_search", field=name)
    if params.logit_bias:
        raise InvalidRequestError("logit_bias is not supported with use_beam_search", field="logit_bias")


def run_beam_searches(
    prompts: Sequence[Sequence[int]],
    searches: Sequence[BeamSearch],
    expand: Callable[[list[list[int]]], list[tuple[list[BeamCandidate], object]]],
) -> None:
    """Step every search until all are done (the offline path). Each step makes one `expand`
    call over every live beam of every prompt, so they run batched side by side; `expand`
    returns, per sequence, its best next tokens and the detail to keep with them."""
    while not all(search.done for search in searches):
        active = [(prompt, search) for prompt, search in zip(prompts, searches) if not search.done]
        sequences = [list(prompt) + list(beam.token_ids) for prompt, search in active for beam in search.live]
        results = expand(sequences)
        start = 0
        for _, search in active:
            chunk = results[start : start + len(search.live)]
            start += len(search.live)
            search.step([candidates for candidates, _ in chunk], [detail for _, detail in chunk])
