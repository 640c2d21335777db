"""Greedy continuations read from a running engine-serve through both surfaces: the token ids
over gRPC Generate, the text through the OpenAI SDK (streamed or not). Shared by the tests
that compare a served model with its transformers reference."""
from __future__ import annotations

import grpc
import openai

from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc


def grpc_greedy_tokens(grpc_address: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    request = inference_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt_ids), return_text=False,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                           ignore_eos=True))
    tokens: list[int] = []
    with grpc.insecure_channel(grpc_address) as channel:
        for event in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
            if event.HasField("delta"):
                tokens.extend(event.delta.token_ids)
    return tokens


def openai_greedy_text(http_url: str | None, prompt: str, max_tokens: int, *,
                       stream: bool) -> str:
    assert http_url is not None, "the server has no REST bridge"
    client = openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    kwargs = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                  extra_body={"ignore_eos": True})
    if stream:
        return "".join(chunk.choices[0].text
                       for chunk in client.completions.create(**kwargs, stream=True)
                       if chunk.choices)
    return client.completions.create(**kwargs).choices[0].text
