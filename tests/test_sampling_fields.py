"""SamplingParams fields and defaults, checked across the proto, the bridge and the engine.

The field lists both sides copy are derived from the proto descriptor
(protoserve/sampling_fields.py) and the defaults come from one table
(protoserve/sampling_defaults.py). These tests make sure a proto field cannot be dropped
silently by either side and that the engine, the bridge schema and /openapi.json agree on
every default.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from engine.sampling_params import SamplingParams
from engine.server import proto_convert
from protoserve.sampling_defaults import SAMPLING_DEFAULTS, SamplingDefaults
from protoserve.sampling_fields import ALL_FIELDS, SAMPLING_FIELDS, UNCLASSIFIED
from protoserve.v1 import common_pb2
from rest_bridge.openai_schemas.chat import ChatCompletionRequest
from rest_bridge.openai_schemas.request_fields import SamplingFields
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.translate import sampling as bridge_sampling

ROOT = Path(__file__).resolve().parent.parent
_DESCRIPTOR = common_pb2.SamplingParams.DESCRIPTOR
ENGINE_PLAIN = SAMPLING_FIELDS.without(proto_convert.SPECIAL_SAMPLING_FIELDS)
BRIDGE_PLAIN = SAMPLING_FIELDS.without(bridge_sampling.SPECIAL_SAMPLING_FIELDS)
# Declared per endpoint with OpenAI's own spelling and meaning (chat `logprobs` is a flag,
# completions' max_tokens defaults to 16), so SamplingFields leaves them out.
PER_ENDPOINT = frozenset({"max_tokens", "logprobs"})


def _sample_value(name: str) -> Any:
    """A value for proto field `name` that differs from its default."""
    field = _DESCRIPTOR.fields_by_name[name]
    if field.message_type is not None:  # a map: int32 token id -> float bias
        return {5: 1.5}
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        one: Any = "word"
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        one = not getattr(SAMPLING_DEFAULTS, name, False)
    elif cpp in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        one = 0.5  # exact in float32
    else:
        one = 3
    return [one, one] if field.is_repeated else one


def test_the_descriptor_classifies_every_field() -> None:
    assert UNCLASSIFIED == ()
    assert set(ALL_FIELDS) == SAMPLING_FIELDS.names()
    assert "stop" in SAMPLING_FIELDS.repeated and "logit_bias" in SAMPLING_FIELDS.map


def test_engine_copies_every_proto_field_or_names_it() -> None:
    assert set(ALL_FIELDS) == ENGINE_PLAIN.names() | proto_convert.SPECIAL_SAMPLING_FIELDS


def test_bridge_copies_every_proto_field_or_names_it() -> None:
    # The bridge has no plain path for maps (JSON keys are strings): each needs a named case.
    copied = set(BRIDGE_PLAIN.scalar + BRIDGE_PLAIN.repeated)
    assert set(ALL_FIELDS) == copied | bridge_sampling.SPECIAL_SAMPLING_FIELDS


def test_exceptions_must_name_real_fields() -> None:
    with pytest.raises(ValueError, match="not_a_field"):
        SAMPLING_FIELDS.without({"temperature", "not_a_field"})


@pytest.mark.parametrize("name", sorted(ENGINE_PLAIN.names()))
def test_engine_plain_field_reaches_sampling_params(name: str) -> None:
    value = _sample_value(name)
    pb = common_pb2.SamplingParams()
    field = getattr(pb, name) if _DESCRIPTOR.fields_by_name[name].is_repeated else None
    if field is None:
        setattr(pb, name, value)
    elif isinstance(value, dict):
        field.update(value)
    else:
        field.extend(value)
    got = getattr(proto_convert.sampling_from_pb(pb), name)
    expected = tuple(value) if isinstance(value, list) else value
    assert got == expected


def test_engine_top_k_minus_one_means_disabled() -> None:
    assert proto_convert.sampling_from_pb(common_pb2.SamplingParams(top_k=-1)).top_k == 0
    assert proto_convert.sampling_from_pb(common_pb2.SamplingParams(top_k=4)).top_k == 4


@pytest.mark.parametrize("name", sorted(BRIDGE_PLAIN.scalar + BRIDGE_PLAIN.repeated))
def test_bridge_plain_field_is_declared_and_forwarded(name: str) -> None:
    # Declared, so pydantic checks its type before it is set on the proto.
    assert name in SamplingFields.model_fields, f"declare {name} on SamplingFields"
    value = _sample_value(name)
    body = CompletionRequest.model_validate({"prompt": "x", name: value})
    pb = bridge_sampling.sampling_params_from(body, max_tokens=None, logprobs=None)
    got = getattr(pb, name)
    assert (list(got) if isinstance(value, list) else got) == value
    untouched = bridge_sampling.sampling_params_from(
        CompletionRequest.model_validate({"prompt": "x"}), max_tokens=None, logprobs=None
    )
    assert untouched == common_pb2.SamplingParams()


def test_defaults_table_covers_exactly_the_optional_scalars() -> None:
    table = {f.name for f in dataclasses.fields(SamplingDefaults)}
    assert table == set(SAMPLING_FIELDS.scalar)


@pytest.mark.parametrize("name", SAMPLING_FIELDS.scalar)
def test_engine_defaults_come_from_the_table(name: str) -> None:
    assert getattr(SamplingParams(), name) == getattr(SAMPLING_DEFAULTS, name)


def test_engine_container_defaults_mean_not_given() -> None:
    params = SamplingParams()
    for name in SAMPLING_FIELDS.repeated + SAMPLING_FIELDS.map:
        assert not getattr(params, name), name


@pytest.mark.parametrize("name", sorted(set(SAMPLING_FIELDS.scalar) - PER_ENDPOINT))
@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_bridge_schema_shows_the_engine_default(model: type[SamplingFields], name: str) -> None:
    default = getattr(SAMPLING_DEFAULTS, name)
    assert model.model_fields[name].default == default
    # What /openapi.json publishes (a None default is published as null).
    assert model.model_json_schema()["properties"][name].get("default") == default


def test_top_k_default_is_disabled_and_minus_one_still_accepted() -> None:
    assert SAMPLING_DEFAULTS.top_k == 0
    body = CompletionRequest.model_validate({"prompt": "x", "top_k": -1})
    pb = bridge_sampling.sampling_params_from(body, max_tokens=None, logprobs=None)
    assert pb.HasField("top_k") and pb.top_k == -1


def test_engine_defaults_load_without_the_stubs() -> None:
    # Inside engine/ only engine/server may depend on protoserve.v1 (tests/test_repo_shape.py
    # checks direct imports); the defaults table must not bring the stubs in indirectly.
    probe = (
        "import sys, engine.sampling_params\n"
        "print(sorted(m for m in sys.modules if m.startswith(('protoserve.v1', 'google'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
