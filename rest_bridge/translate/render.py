"""Inference/Render's answer -> the reference server's token-in GenerateRequest JSON (the
body of its /render routes), sampling parameters under the reference's SamplingParams names."""
from __future__ import annotations

import json
import math
import struct
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from protoserve.sampling_fields import SAMPLING_FIELDS
from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.errors import invalid_request
from rest_bridge.openai_schemas.request_fields import SamplingFields

# Beam search is refused by Render (the reference's SamplingParams cannot express it), so its
# fields say nothing about a rendered request.
_BEAM_ONLY = frozenset({"use_beam_search", "length_penalty"})
# Handled by hand: JSON object keys are strings; an empty list means "every token" (null).
_SPECIAL = frozenset({"logit_bias", "allowed_token_ids"})
_SHOWN = SAMPLING_FIELDS.without(_BEAM_ONLY | _SPECIAL)
_FIELDS = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
FLOAT32_MAX = 3.4028234663852886e38
_CONSTRAINT_KEYS = {"json_schema": "json", "regex": "regex", "choice": "choice",
                    "grammar": "grammar", "json_object": "json_object"}


def generate_request_json(
    body: SamplingFields, rendered: inference_pb2.RenderResponse, id_prefix: str
) -> dict[str, Any]:
    """The GenerateRequest object for one rendered prompt of `body`."""
    stream = bool(body.stream)
    options = body.stream_options if stream else None
    return {
        "request_id": f"{id_prefix}-{rendered.request_id}",
        "token_ids": list(rendered.prompt_token_ids),
        "features": None,
        "sampling_params": sampling_params_json(
            rendered.sampling,
            rendered.constraint if rendered.HasField("constraint") else None),
        "model": body.model,
        "stream": stream,
        "stream_options": options.model_dump() if options is not None else None,
        "cache_salt": body.cache_salt,
        "priority": body.priority or 0,
    }


def sampling_params_json(
    sampling: common_pb2.SamplingParams, constraint: common_pb2.OutputConstraint | None
) -> dict[str, Any]:
    """Resolved SamplingParams (every value Render knows is set) as JSON; unset scalars are
    null ("none": no seed, no logprobs)."""
    params: dict[str, Any] = {}
    for name in _SHOWN.scalar:
        value = getattr(sampling, name) if sampling.HasField(name) else None
        if isinstance(value, float) and _FIELDS[name].type == FieldDescriptor.TYPE_FLOAT:
            value = json_float32(value, name)
        params[name] = value
    for name in _SHOWN.repeated:
        params[name] = list(getattr(sampling, name))
    params["logit_bias"] = {
        str(token_id): json_float32(bias, "logit_bias")
        for token_id, bias in sampling.logit_bias.items()}
    params["allowed_token_ids"] = list(sampling.allowed_token_ids) or None
    params["structured_outputs"] = (
        structured_outputs_json(constraint) if constraint is not None else None)
    return params


def structured_outputs_json(constraint: common_pb2.OutputConstraint) -> dict[str, Any]:
    kind = constraint.WhichOneof("kind")
    result: dict[str, Any] = {}
    if kind == "json_schema":
        result["json"] = json.loads(constraint.json_schema)
    elif kind == "choice":
        result["choice"] = list(constraint.choice.choices)
    elif kind is not None:
        result[_CONSTRAINT_KEYS[kind]] = getattr(constraint, kind)
    if constraint.HasField("whitespace_pattern"):
        result["whitespace_pattern"] = constraint.whitespace_pattern
    if constraint.HasField("backend"):
        result["backend"] = constraint.backend
    return result


def json_float32(value: float, field: str) -> float:
    """A float32 the engine holds, as JSON can carry it. A value beyond float32's range
    arrives infinite (a logit_bias of -1e300 bans its token) and JSON has no infinity: it is
    shown as float32's largest finite value of that sign, which acts the same."""
    if math.isnan(value):
        raise invalid_request(f"{field} must be a number, got NaN", param=field)
    if math.isinf(value):
        return math.copysign(FLOAT32_MAX, value)
    return shortest_float32(value)


def shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32: a temperature sent as 0.7 travels as
    0.699999988079071 and reads back as 0.7."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value
