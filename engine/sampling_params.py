"""Per-request generation parameters, validated once at the boundary (server -> engine)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from protoserve.sampling_defaults import SAMPLING_DEFAULTS as _D

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What to generate and when to stop. Greedy is temperature == 0.

    `max_tokens=None` means "the rest of the context window"; the engine resolves it against
    the prompt length at admission.
    """

    # Scalar defaults come from the one table the bridge's OpenAI schema also uses.
    temperature: float = _D.temperature
    top_p: float = _D.top_p
    top_k: int = _D.top_k  # 0 disables; -1 is accepted at the boundary and normalised to 0
    min_p: float = _D.min_p
    presence_penalty: float = _D.presence_penalty
    frequency_penalty: float = _D.frequency_penalty
    repetition_penalty: float = _D.repetition_penalty
    seed: int | None = _D.seed
    max_tokens: int | None = _D.max_tokens
    min_tokens: int = _D.min_tokens
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = _D.include_stop_str_in_output
    ignore_eos: bool = _D.ignore_eos
    n: int = _D.n
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = _D.logprobs
    prompt_logprobs: int | None = _D.prompt_logprobs
    skip_special_tokens: bool = _D.skip_special_tokens
    spaces_between_special_tokens: bool = _D.spaces_between_special_tokens
    # None: every token allowed; otherwise only these may be sampled.
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    # `bad_words` as token sequences, filled in by the input processor with the engine's
    # tokenizer (the sampler reads only this).
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    truncate_prompt_tokens: int | None = _D.truncate_prompt_tokens
    # Candidates generated per request, of which the n with the best cumulative logprob return.
    best_of: int | None = _D.best_of
    use_beam_search: bool = _D.use_beam_search
    length_penalty: float = _D.length_penalty

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field out of range."""
        if not self.temperature >= 0.0:
            _bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            _bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            _bad("top_k", f"must be -1 (disabled) or >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            _bad("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                _bad(name, f"must be in [-2, 2], got {value}")
        if not self.repetition_penalty > 0.0:
            _bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not _INT64_MIN <= self.seed <= _INT64_MAX:
            _bad("seed", "must fit in a signed 64-bit integer")
        if self.max_tokens is not None and self.max_tokens < 1:
            _bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            _bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _bad("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if any(s == "" for s in self.stop):
            _bad("stop", "stop strings must not be empty")
        if self.n < 1:
            _bad("n", f"must be >= 1, got {self.n}")
        # Beam search is deterministic and still returns n different beams.
        if self.n > 1 and self.is_greedy and not self.use_beam_search:
            _bad("n", "n > 1 needs sampling (temperature > 0): greedy samples would be identical")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                _bad(name, f"must be >= 0, got {value}")
        self._validate_extras()

    def _validate_extras(self) -> None:
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            _bad("truncate_prompt_tokens", f"must be >= 1, got {self.truncate_prompt_tokens}")
        if self.best_of is not None:
            if self.best_of < self.n:
                _bad("best_of", f"({self.best_of}) must be >= n ({self.n})")
            if self.best_of > 1 and self.is_greedy and not self.use_beam_search:
                _bad("best_of", "best_of > 1 needs sampling (temperature > 0)")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            _bad("allowed_token_ids", "must not be empty")
        if any(not word.strip() for word in self.bad_words):
            _bad("bad_words", "bad words must not be empty")


def _bad(field_name: str, message: str) -> None:
    raise InvalidRequestError(f"{field_name} {message}", field=field_name)
