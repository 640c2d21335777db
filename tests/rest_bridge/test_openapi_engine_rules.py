"""The ranges /openapi.json states for sampling fields are the engine's own: each stated bound
is accepted where the engine takes SamplingParams off the wire (conversion, then validate) and
the value just past it is refused."""
from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from engine.errors import InvalidRequestError
from engine.server.proto_convert import sampling_from_pb
from protoserve.v1 import common_pb2
from rest_bridge.openai_schemas.chat import ChatCompletionRequest
from rest_bridge.openai_schemas.completion import CompletionRequest

_SCHEMA = CompletionRequest.model_json_schema()["properties"]
# Fields the engine checks in SamplingParams.validate, with a value past each stated bound.
_STEP = 1e-3
_RANGED = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "max_tokens", "min_tokens", "n", "best_of", "logprobs",
           "prompt_logprobs", "truncate_prompt_tokens")


def _number_schema(name: str) -> dict[str, Any]:
    return next(member for member in _SCHEMA[name]["anyOf"] if member["type"] != "null")


def _validate(name: str, value: float) -> None:
    # Greedy-only rules (n > 1 needs sampling) are not what this test is about.
    params: dict[str, Any] = {name: value, "temperature": 1.0} if name != "temperature" else {
        name: value}
    if name == "best_of":
        params["n"] = 1
    sampling_from_pb(common_pb2.SamplingParams(**params)).validate()


@pytest.mark.parametrize("name", _RANGED)
def test_stated_bounds_are_the_engines(name: str) -> None:
    schema = _number_schema(name)
    integral = schema["type"] == "integer"
    step = 1 if integral else _STEP
    stated = [key for key in ("minimum", "maximum", "exclusiveMinimum") if key in schema]
    assert stated, f"{name}: no bound in /openapi.json"
    for key in stated:
        bound = schema[key]
        inside = bound + step if key == "exclusiveMinimum" else bound
        outside = bound if key == "exclusiveMinimum" else (
            bound - step if key == "minimum" else bound + step)
        if key == "maximum" and integral and bound >= 2**31 - 1:
            continue  # the wire width, checked by the bridge itself
        _validate(name, int(inside) if integral else inside)
        with pytest.raises(InvalidRequestError) as refused:
            _validate(name, int(outside) if integral else outside)
        assert name in str(refused.value)


def test_float32_fields_say_so() -> None:
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "length_penalty"):
        assert _number_schema(name)["format"] == "float", name


def test_integral_json_numbers_are_integers() -> None:
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "n": 2.0, "seed": 3.0})
    assert (body.n, body.seed) == (2, 3) and isinstance(body.n, int)
    for value in (2.5, "2", True, math.ldexp(1, 40)):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(
                {"messages": [{"role": "user", "content": "x"}], "n": value})


def test_empty_allowed_token_ids_is_refused_by_name() -> None:
    # An empty repeated field cannot cross the proto, so the engine would never see it.
    with pytest.raises(ValidationError) as refused:
        CompletionRequest.model_validate({"prompt": "x", "allowed_token_ids": []})
    assert "allowed_token_ids" in str(refused.value)


def test_cross_field_rules_are_in_the_document() -> None:
    rules = ChatCompletionRequest.model_json_schema()["allOf"]
    conditions = [rule["if"]["required"][0] for rule in rules]
    assert conditions == ["stream_options", "top_logprobs", "continue_final_message",
                          "tool_choice"]
    suffix = CompletionRequest.model_json_schema()["properties"]["suffix"]
    assert suffix["type"] == "null"
