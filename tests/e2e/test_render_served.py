"""`/v1/chat/completions/render` and `/v1/completions/render` on a real engine-serve: the
token ids are those /tokenize and the generating routes see, the sampling parameters are the
resolved ones, running them over gRPC gives the chat route's text, and bad bodies get the
real route's 4xx naming the field."""
from __future__ import annotations

import grpc
import httpx
import pytest
from served_engine import RunningServer

from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."}]


def _post(server: RunningServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def _tokenize(server: RunningServer, body: dict) -> list[int]:
    reply = _post(server, "/tokenize", body)
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def test_chat_render_is_the_prompt_and_sampling_the_chat_route_runs(
    served_model: RunningServer,
) -> None:
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0.0, "seed": 3,
            "stop": ["\n\n"], "cache_salt": "tenant-a", "priority": 2}
    rendered = _post(served_model, "/v1/chat/completions/render", body)
    assert rendered.status_code == 200, rendered.text
    request = rendered.json()
    assert set(request) == {"request_id", "token_ids", "features", "sampling_params", "model",
                            "stream", "stream_options", "cache_salt", "priority"}
    assert request["request_id"].startswith("chatcmpl-")
    assert (request["features"], request["stream"], request["stream_options"]) == (
        None, False, None)
    assert (request["cache_salt"], request["priority"]) == ("tenant-a", 2)
    token_ids = request["token_ids"]
    assert token_ids == _tokenize(served_model, {"messages": MESSAGES})

    sampling = request["sampling_params"]
    # As sent, and the engine's defaults for the rest.
    assert (sampling["max_tokens"], sampling["temperature"], sampling["seed"]) == (6, 0.0, 3)
    assert sampling["stop"] == ["\n\n"]
    assert (sampling["top_p"], sampling["top_k"], sampling["n"]) == (1.0, 0, 1)
    assert (sampling["logprobs"], sampling["allowed_token_ids"]) == (None, None)
    assert sampling["structured_outputs"] is None

    chat = _post(served_model, "/v1/chat/completions", body)
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(token_ids)

    # Running the rendered request token-in gives the chat route's greedy text.
    generate = inference_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=token_ids),
        sampling=common_pb2.SamplingParams(
            max_tokens=sampling["max_tokens"], temperature=sampling["temperature"],
            seed=sampling["seed"], stop=sampling["stop"]))
    with grpc.insecure_channel(f"127.0.0.1:{served_model.grpc_port}") as channel:
        events = list(inference_pb2_grpc.InferenceStub(channel).Generate(generate, timeout=60))
    text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    assert text == chat.json()["choices"][0]["message"]["content"]


def test_unset_max_tokens_is_the_context_left_after_the_prompt(
    served_model: RunningServer,
) -> None:
    request = _post(served_model, "/v1/chat/completions/render", {"messages": MESSAGES}).json()
    max_model_len = _post(served_model, "/tokenize", {"prompt": "x"}).json()["max_model_len"]
    assert request["sampling_params"]["max_tokens"] == max_model_len - len(request["token_ids"])


def test_completion_render_of_one_prompt_and_of_a_list(served_model: RunningServer) -> None:
    one = _post(served_model, "/v1/completions/render", {"prompt": "Once upon a time"})
    assert one.status_code == 200, one.text
    (request,) = one.json()
    assert request["token_ids"] == _tokenize(served_model, {"prompt": "Once upon a time"})
    # OpenAI's completion default of 16 tokens, the engine's float32 read back as sent.
    assert request["sampling_params"]["max_tokens"] == 16

    prompts = ["The cat", "A long time ago"]
    many = _post(served_model, "/v1/completions/render",
                 {"prompt": prompts, "temperature": 0.7, "stream": True,
                  "stream_options": {"include_usage": True}})
    assert many.status_code == 200, many.text
    requests = many.json()
    assert [r["token_ids"] for r in requests] == [
        _tokenize(served_model, {"prompt": prompt}) for prompt in prompts]
    assert len({r["request_id"] for r in requests}) == 2
    assert all(r["sampling_params"]["temperature"] == 0.7 for r in requests)
    assert all(r["stream"] and r["stream_options"]["include_usage"] for r in requests)


def test_completion_render_of_token_id_prompts(served_model: RunningServer) -> None:
    ids = _tokenize(served_model, {"prompt": "Once upon a time"})
    reply = _post(served_model, "/v1/completions/render",
                  {"prompt": [ids, ids[-3:]], "truncate_prompt_tokens": 4})
    assert reply.status_code == 200, reply.text
    # The engine keeps the last truncate_prompt_tokens tokens, as it would when generating.
    assert [r["token_ids"] for r in reply.json()] == [ids[-4:], ids[-3:]]


def test_guided_decoding_shows_as_structured_outputs(served_model: RunningServer) -> None:
    body = {"messages": MESSAGES, "guided_choice": ["red", "blue"]}
    request = _post(served_model, "/v1/chat/completions/render", body).json()
    assert request["sampling_params"]["structured_outputs"]["choice"] == ["red", "blue"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions/render", {"messages": MESSAGES, "temperature": -1.0}, "temperature"),
    ("/v1/chat/completions/render", {"messages": MESSAGES, "max_completion_tokens": 10**6},
     "max_completion_tokens"),
    ("/v1/chat/completions/render",
     {"messages": MESSAGES, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions/render", {"messages": MESSAGES, "use_beam_search": True,
                                      "n": 2}, "use_beam_search"),
    ("/v1/completions/render", {"prompt": "Hi", "top_p": 0.0}, "top_p"),
    ("/v1/completions/render", {"prompt": [10**7]}, "prompt"),
])
def test_bad_input_is_refused_naming_the_field(
    served_model: RunningServer, path: str, body: dict, param: str
) -> None:
    reply = _post(served_model, path, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    if param != "use_beam_search":  # the generating route runs beam search
        generating = _post(served_model, path.removesuffix("/render"), body)
        assert (generating.status_code, generating.json()["error"]["param"]) == (400, param)


def test_unknown_model_is_404(served_model: RunningServer) -> None:
    reply = _post(served_model, "/v1/chat/completions/render",
                  {"model": "no-such-model", "messages": MESSAGES})
    assert reply.status_code == 404, reply.text


def test_grpc_render_answers_what_generate_would_run(served_model: RunningServer) -> None:
    chat = common_pb2.ChatInput(messages=[
        common_pb2.ChatMessage(role=m["role"], text=m["content"]) for m in MESSAGES])
    generate = inference_pb2.GenerateRequest(
        chat=chat, sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0.0),
        constraint=common_pb2.OutputConstraint(regex="[a-z]+"))
    with grpc.insecure_channel(f"127.0.0.1:{served_model.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        rendered = stub.Render(inference_pb2.RenderRequest(request=generate), timeout=60)
        generate.return_prompt_token_ids = True
        events = list(stub.Generate(generate, timeout=60))
        bad = inference_pb2.GenerateRequest(
            text="Hi", sampling=common_pb2.SamplingParams(temperature=-1.0))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Render(inference_pb2.RenderRequest(request=bad), timeout=60)
    started = next(e.started for e in events if e.WhichOneof("event") == "started")
    assert list(rendered.prompt_token_ids) == list(started.prompt_token_ids)
    assert rendered.prompt_text == started.prompt_text
    assert "Name a colour." in rendered.prompt_text
    assert (rendered.sampling.max_tokens, rendered.sampling.temperature) == (3, 0.0)
    # Every scalar the engine holds a value for is set: the defaults are resolved.
    assert rendered.sampling.HasField("top_p") and rendered.sampling.top_p == 1.0
    assert rendered.constraint.regex == "[a-z]+" and rendered.constraint.HasField("backend")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in (refused.value.details() or "")
