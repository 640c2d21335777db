"""`--speculative-config`: the reference server's JSON shape, validated at start-up.

    {"method": "ngram", "num_speculative_tokens": 4,
     "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    {"method": "draft_model", "model": "/path/to/small-model", "num_speculative_tokens": 4}
    {"method": "eagle", "model": "/path/to/eagle-head", "num_speculative_tokens": 4}

Every error names the offending field, so a bad flag fails start-up with a clear message.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

SPEC_METHODS = ("ngram", "draft_model", "eagle")
# Methods that read a checkpoint named by the config's `model` field.
MODEL_METHODS = ("draft_model", "eagle")
# Fields of the reference's config this engine reads; others are refused rather than ignored,
# so a typo never silently turns speculation into something else.
_KNOWN_FIELDS = (
    "method",
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "acceptance_floor",
    "model",
)


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    # Most draft tokens verified per request and step.
    num_speculative_tokens: int = 4
    # Longest and shortest suffix n-gram looked up in the request's earlier tokens.
    prompt_lookup_max: int = 4
    # Single-token matches are mostly chance on text that does not repeat itself.
    prompt_lookup_min: int = 2
    # Back-off: a request whose estimated chance of a draft being accepted (from its recent
    # verifications) falls below this stops proposing for a while
    # (engine.spec_decode.proposals; the step cost model may stop it earlier).
    acceptance_floor: float = 0.25
    # draft_model: the draft's local checkpoint directory (same tokenizer as the target);
    # eagle: the EAGLE-1 head's directory (engine.spec_decode.eagle_head).
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(
                f"speculative config field 'method' must be one of {', '.join(SPEC_METHODS)}, "
                f"got {self.method!r}"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"speculative config field {name!r} must be an integer >= 1, got {value!r}"
                )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                "speculative config field 'prompt_lookup_min' must be <= prompt_lookup_max, "
                f"got {self.prompt_lookup_min} > {self.prompt_lookup_max}"
            )
        if self.method in MODEL_METHODS and not (isinstance(self.model, str) and self.model):
            raise ValueError(
                f"speculative config field 'model' is required for method {self.method} "
                "(the draft's checkpoint directory)"
            )
        if self.method not in MODEL_METHODS and self.model is not None:
            raise ValueError(
                "speculative config field 'model' is only for methods "
                f"{', '.join(MODEL_METHODS)}"
            )
        floor = self.acceptance_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise ValueError(
                f"speculative config field 'acceptance_floor' must be in [0, 1], got {floor!r}"
            )


def parse_speculative_config(text: str | dict) -> SpeculativeConfig:
    """The config from the flag's JSON text (or an already parsed object, from a YAML config
    file). Raises ValueError naming the field at fault."""
    if isinstance(text, dict):
        value = text
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative config is not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ValueError("speculative config must be a JSON object")
    unknown = sorted(set(value) - set(_KNOWN_FIELDS))
    if unknown:
        raise ValueError(
            f"speculative config field {unknown[0]!r} is not supported "
            f"(known: {', '.join(_KNOWN_FIELDS)})"
        )
    if "method" not in value:
        raise ValueError("speculative config field 'method' is required")
    if "num_speculative_tokens" not in value:
        raise ValueError("speculative config field 'num_speculative_tokens' is required")
    lookup_max = value.get("prompt_lookup_max")
    if "prompt_lookup_min" not in value and isinstance(lookup_max, int) and lookup_max >= 1:
        # A short lookup_max alone: the default minimum must not exceed it.
        default_min = SpeculativeConfig.prompt_lookup_min
        value = {**value, "prompt_lookup_min": min(default_min, lookup_max)}
    return SpeculativeConfig(**value)


def speculative_config_arg(text: str) -> SpeculativeConfig:
    """argparse `type=`: the error message becomes the flag's usage error."""
    try:
        return parse_speculative_config(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
