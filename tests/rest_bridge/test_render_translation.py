"""The render routes' JSON: Inference/Render's resolved SamplingParams under the reference's
SamplingParams names, read back from the engine's own SamplingParams (engine -> wire ->
JSON), and the GenerateRequest object around them."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from engine.sampling_params import SamplingParams
from engine.server.proto_convert import sampling_from_pb
from engine.server.render_convert import constraint_to_pb, sampling_to_pb
from engine.structured.constraint import OutputConstraint
from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.errors import BridgeError
from rest_bridge.openai_schemas.render import (
    ChatRenderRequest,
    CompletionRenderRequest,
    RenderedGenerateRequest,
    RenderedSamplingParams,
)
from rest_bridge.translate.render import (
    FLOAT32_MAX,
    generate_request_json,
    sampling_params_json,
    shortest_float32,
)


def test_engine_defaults_read_back_as_the_engine_holds_them() -> None:
    params = SamplingParams(max_tokens=100)
    shown = sampling_params_json(sampling_to_pb(params), None)
    RenderedSamplingParams.model_validate(shown)
    assert set(shown) == set(RenderedSamplingParams.model_fields)
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "seed", "max_tokens", "min_tokens",
                 "n", "best_of", "logprobs", "prompt_logprobs", "ignore_eos",
                 "skip_special_tokens", "spaces_between_special_tokens",
                 "include_stop_str_in_output", "truncate_prompt_tokens"):
        assert shown[name] == getattr(params, name), name
    assert (shown["stop"], shown["stop_token_ids"], shown["bad_words"]) == ([], [], [])
    # None in the engine (every token allowed) is null, not an empty list.
    assert (shown["allowed_token_ids"], shown["logit_bias"]) == (None, {})
    assert shown["structured_outputs"] is None


def test_set_values_survive_the_wire_and_float32() -> None:
    params = SamplingParams(
        temperature=0.7, top_p=0.95, top_k=40, min_p=0.05, repetition_penalty=1.1, seed=7,
        max_tokens=12, stop=("END",), stop_token_ids=(2,), logit_bias={5: -1.5},
        allowed_token_ids=(3, 4, 5), bad_words=("no",), logprobs=2, n=2,
    )
    wire = sampling_to_pb(params)
    # The engine reads its own wire form back unchanged (float32 aside).
    again = sampling_from_pb(wire)
    assert again.allowed_token_ids == params.allowed_token_ids
    assert again.logit_bias == params.logit_bias
    shown = sampling_params_json(wire, None)
    assert (shown["temperature"], shown["top_p"], shown["min_p"]) == (0.7, 0.95, 0.05)
    assert shown["repetition_penalty"] == 1.1
    assert (shown["top_k"], shown["seed"], shown["max_tokens"], shown["n"]) == (40, 7, 12, 2)
    assert (shown["stop"], shown["stop_token_ids"], shown["bad_words"]) == (["END"], [2], ["no"])
    assert shown["logit_bias"] == {"5": -1.5}
    assert shown["allowed_token_ids"] == [3, 4, 5]
    assert shown["logprobs"] == 2


@pytest.mark.parametrize(("constraint", "expected"), [
    (OutputConstraint(json_schema='{"type": "object"}', backend="llguidance"),
     {"json": {"type": "object"}, "backend": "llguidance"}),
    (OutputConstraint(regex="[a-z]+"), {"regex": "[a-z]+"}),
    (OutputConstraint(choice=("a", "b")), {"choice": ["a", "b"]}),
    (OutputConstraint(grammar="start: 'x'"), {"grammar": "start: 'x'"}),
    (OutputConstraint(json_object=True, whitespace_pattern=" ?"),
     {"json_object": True, "whitespace_pattern": " ?"}),
])
def test_constraints_show_as_structured_outputs(
    constraint: OutputConstraint, expected: dict
) -> None:
    shown = sampling_params_json(common_pb2.SamplingParams(), constraint_to_pb(constraint))
    assert shown["structured_outputs"] == expected


@pytest.mark.parametrize("value", [0.7, 0.1, 1e-8, 0.95, 1.0, 123.456, 0.0, -2.0])
def test_shortest_float32_is_the_same_float32(value: float) -> None:
    wire = common_pb2.SamplingParams(temperature=value).temperature  # the float32 read back
    assert shortest_float32(wire) == value


def test_generate_request_object_has_the_reference_shape() -> None:
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True},
         "cache_salt": "s", "priority": 3})
    rendered = inference_pb2.RenderResponse(
        request_id="abc-1", prompt_token_ids=[1, 2, 3],
        sampling=sampling_to_pb(SamplingParams(max_tokens=16)))
    shown = generate_request_json(body, rendered, "cmpl")
    RenderedGenerateRequest.model_validate(json.loads(json.dumps(shown)))
    assert shown["request_id"] == "cmpl-abc-1"
    assert shown["token_ids"] == [1, 2, 3]
    assert (shown["features"], shown["model"], shown["cache_salt"], shown["priority"]) == (
        None, "m", "s", 3)
    assert shown["stream"] is True
    assert shown["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    # stream_options only travel with a streaming request.
    body = CompletionRequest.model_validate({"prompt": "hi"})
    shown = generate_request_json(body, rendered, "cmpl")
    assert (shown["stream"], shown["stream_options"], shown["model"]) == (False, None, None)


def test_out_of_range_floats_show_as_float32_extremes_and_nan_is_refused() -> None:
    # -1e300 arrives infinite on the wire (a ban of the token); JSON has no infinity.
    wire = common_pb2.SamplingParams(temperature=1e300)
    wire.logit_bias[7] = -1e300
    shown = sampling_params_json(wire, None)
    assert shown["temperature"] == FLOAT32_MAX
    assert shown["logit_bias"] == {"7": -FLOAT32_MAX}
    json.dumps(shown, allow_nan=False)
    wire.logit_bias[7] = float("nan")
    with pytest.raises(BridgeError) as refused:
        sampling_params_json(wire, None)
    assert refused.value.param == "logit_bias"


@pytest.mark.parametrize("value", [True, 0, 1])
def test_render_bodies_refuse_beam_search(value: object) -> None:
    with pytest.raises(ValidationError) as refused:
        ChatRenderRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "use_beam_search": value})
    assert refused.value.errors()[0]["loc"] == ("use_beam_search",)
    assert CompletionRenderRequest.model_validate(
        {"prompt": "hi", "use_beam_search": False}).use_beam_search is False
