"""Named and `required` tool_choice against the real engine: structured output guarantees the
arguments are valid JSON for the function's schema, even from a random-weight model."""
from __future__ import annotations

import json
from collections.abc import Callable

import jsonschema
import pytest
from engine_process import EngineProcess
from openai import OpenAI

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(shared_server: Callable[..., EngineProcess]) -> OpenAI:
    server = shared_server(role="all")  # engine-serve's defaults, as served_model
    return OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("seed", range(4))
def test_named_tool_choice_returns_schema_valid_arguments(client: OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0, seed=seed, max_tokens=120,
        extra_body={"guided_whitespace_pattern": ""},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_calls_a_listed_function(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Weather in Rome for 2 days?"}],
        tools=[WEATHER], tool_choice="required", temperature=1.0, seed=7, max_tokens=160,
        extra_body={"guided_whitespace_pattern": ""},
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
