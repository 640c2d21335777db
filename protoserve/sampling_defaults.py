"""The documented default of every optional SamplingParams scalar, declared once.

The engine's SamplingParams dataclass and the bridge's OpenAI request schema both take their
defaults from here, so the engine applies the values /openapi.json shows. The bridge still
forwards only the fields a client set; these are what the engine uses for the rest.

Plain Python on purpose: engine/sampling_params.py imports this, and inside engine/ only
engine/server may import the generated protoserve.v1 stubs (tests/test_repo_shape.py).
Repeated and map fields (stop, stop_token_ids, allowed_token_ids, bad_words, logit_bias)
default to empty, meaning "not given", and need no entry. tests/test_sampling_fields.py checks
that this table names exactly the proto's optional scalars.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    # 0 disables. -1 (vLLM's spelling of "disabled") is accepted too; the engine normalises it.
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1.0 is off
    seed: int | None = None  # None: no per-request seed
    # None: the rest of the context window. The bridge's completions endpoint sends OpenAI's 16
    # explicitly when the client sends nothing, which is that endpoint's rule, not a default.
    max_tokens: int | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None  # None: n
    logprobs: int | None = None  # None: no logprobs
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # None: the whole prompt
    use_beam_search: bool = False
    length_penalty: float = 1.0


SAMPLING_DEFAULTS = SamplingDefaults()
