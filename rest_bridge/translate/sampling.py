"""OpenAI sampling and guided-decoding fields -> SamplingParams and OutputConstraint.

Only fields the client sent are set on the proto (proto3 `optional` presence), so the engine
applies its own documented defaults to everything else. Range checks are the engine's: values
are forwarded as given and a bad one comes back as INVALID_ARGUMENT naming the field.
"""
from __future__ import annotations

import json

from protoserve.sampling_fields import SAMPLING_FIELDS
from protoserve.v1 import common_pb2
from rest_bridge.errors import invalid_request
from rest_bridge.openai_schemas.request_fields import INT32_MAX, INT32_MIN, SamplingFields

# SamplingParams fields sampling_params_from sets by hand; every other optional scalar and
# repeated field of the proto is copied as is from the same-named OpenAI field (declared on
# SamplingFields), so a plain field added to the proto needs no edit here.
#   max_tokens, logprobs: spelled differently per endpoint, resolved by the caller;
#   stop: OpenAI allows a bare string as well as a list;
#   logit_bias: JSON object keys are strings, the proto's are token ids.
SPECIAL_SAMPLING_FIELDS = frozenset({"max_tokens", "logprobs", "stop", "logit_bias"})
# No plain path for maps: JSON keys are strings, so each map needs a named case that converts
# them (tests/test_sampling_fields.py fails for a map field left out of the set above).
_PLAIN = SAMPLING_FIELDS.without(SPECIAL_SAMPLING_FIELDS)

# Guided-decoding fields of which at most one may be given (the proto holds one constraint).
_GUIDED_KINDS: tuple[str, ...] = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


# The proto's OutputConstraint kinds, as engine errors name them ("constraint.<kind>").
_CONSTRAINT_KINDS: tuple[str, ...] = ("json_schema", "regex", "choice", "grammar", "json_object")


def sampling_params_from(

    body: SamplingFields, *, max_tokens: int | None, logprobs: int | None
) -> common_pb2.SamplingParams:
    """Build SamplingParams from the fields `body` set.

    `max_tokens` and `logprobs` are resolved by the caller because their OpenAI spelling
    differs per endpoint; None leaves them unset (engine default).
    """
    params = common_pb2.SamplingParams()
    for name in _PLAIN.scalar:
        if body.is_set(name):
            setattr(params, name, getattr(body, name))
    for name in _PLAIN.repeated:
        if body.is_set(name):
            getattr(params, name).extend(getattr(body, name))
    if body.is_set("stop"):
        stop = body.stop
        params.stop.extend([stop] if isinstance(stop, str) else stop)
    if body.is_set("logit_bias"):
        _copy_logit_bias(body.logit_bias or {}, params)
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if logprobs is not None:
        params.logprobs = logprobs
    return params


def _copy_logit_bias(logit_bias: dict[str, float], params: common_pb2.SamplingParams) -> None:
    # JSON object keys are strings; OpenAI defines them as token ids.
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise invalid_request(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        if not INT32_MIN <= token_id <= INT32_MAX:
            raise invalid_request(f"logit_bias key {key} is not a token id", param="logit_bias")
        params.logit_bias[token_id] = bias


def output_constraint_from(body: SamplingFields) -> common_pb2.OutputConstraint | None:
    """The one guided-decoding constraint `body` asks for, or None."""
    given = [name for name in _GUIDED_KINDS if body.is_set(name)]
    response_kind = _response_format_kind(body)
    if response_kind is not None:
        given.append("response_format")
    if len(given) > 1:
        raise invalid_request(
            f"only one kind of guided decoding may be requested, got {', '.join(given)}",
            param=given[1],
        )
    if not given:
        return None
    constraint = common_pb2.OutputConstraint()
    kind = given[0]
    if kind == "guided_json":
        schema = body.guided_json
        constraint.json_schema = schema if isinstance(schema, str) else json.dumps(schema)
    elif kind == "guided_regex":
        constraint.regex = body.guided_regex or ""
    elif kind == "guided_choice":
        # SetInParent: an empty list still selects `choice`, so the engine rejects it by name
        # instead of the request running unconstrained.
        constraint.choice.SetInParent()
        constraint.choice.choices.extend(body.guided_choice or [])
    elif kind == "guided_grammar":
        constraint.grammar = body.guided_grammar or ""
    else:
        _apply_response_format(body, constraint)
    if body.is_set("guided_whitespace_pattern"):
        constraint.whitespace_pattern = body.guided_whitespace_pattern or ""
    if body.is_set("guided_decoding_backend"):
        constraint.backend = body.guided_decoding_backend or ""
    return constraint


def _response_format_kind(body: SamplingFields) -> str | None:
    """`json_object` or `json_schema` when response_format constrains output; `text` does not."""
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    return response_format.type


def _apply_response_format(
    body: SamplingFields, constraint: common_pb2.OutputConstraint
) -> None:
    response_format = body.response_format
    assert response_format is not None  # guaranteed by _response_format_kind
    if response_format.type == "json_object":
        constraint.json_object = True
        return
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise invalid_request(
            "response_format of type json_schema needs json_schema.schema",
            param="response_format.json_schema",
        )
    # `strict` is accepted either way: the engine always enforces the whole schema.
    constraint.json_schema = json.dumps(spec.json_schema)


def constraint_field_aliases(body: SamplingFields) -> dict[str, str]:
    """Engine error fields about the constraint -> the OpenAI field the client sent (empty
    when the client asked for no guided decoding)."""
    sent = next((name for name in _GUIDED_KINDS if body.is_set(name)), None)
    if sent is None and _response_format_kind(body) is not None:
        sent = "response_format"
    if sent is None:
        return {}
    aliases = {f"constraint.{kind}": sent for kind in _CONSTRAINT_KINDS}
    aliases["constraint"] = sent
    aliases["constraint.whitespace_pattern"] = "guided_whitespace_pattern"
    aliases["constraint.backend"] = "guided_decoding_backend"
    return aliases

