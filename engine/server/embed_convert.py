"""protoserve.v1 Embed messages <-> the engine's embedding types, and one Embed call end to
end: validate, queue one pooling request per input, answer the vectors in input order."""
from __future__ import annotations

from engine.frontend.served_model import Engine
from engine.errors import InvalidRequestError
from engine.generation import EmbeddingRequest, PromptInput
from engine.pooling_params import PoolingParams
from engine.frontend.pooling_stream import embedding_of
from engine.server.proto_convert import chat_from_pb
from protoserve.v1 import inference_pb2


def embedding_request_from_pb(pb: inference_pb2.EmbedRequest, request_id: str) -> EmbeddingRequest:
    inputs = []
    for index, item in enumerate(pb.inputs):
        which = item.WhichOneof("input")
        if which == "text":
            inputs.append(PromptInput(text=item.text))
        elif which == "token_ids":
            inputs.append(PromptInput(token_ids=list(item.token_ids.ids)))
        elif which == "chat":
            inputs.append(PromptInput(chat=chat_from_pb(item.chat)))
        else:
            raise InvalidRequestError(
                f"input {index} has none of text, token_ids or chat", field="inputs"
            )
    params = PoolingParams(
        normalize=pb.normalize if pb.HasField("normalize") else True,
        dimensions=pb.dimensions if pb.HasField("dimensions") else None,
    )
    return EmbeddingRequest(
        request_id=request_id,
        inputs=tuple(inputs),
        params=params,
        truncate_prompt_tokens=(
            pb.truncate_prompt_tokens if pb.HasField("truncate_prompt_tokens") else None
        ),
        add_special_tokens=pb.add_special_tokens if pb.HasField("add_special_tokens") else None,
        priority=pb.priority,
    )


async def embed(
    engine: Engine, req: EmbeddingRequest, deadline: float | None
) -> inference_pb2.EmbedResponse:
    # Tokenizing (and rendering chat inputs) off the event loop, as for generation.
    requests = await engine.loop.off_loop(engine.embedding_processor.make_requests, req)
    pooled = await engine.loop.embed(req.request_id, requests, deadline)
    response = inference_pb2.EmbedResponse(request_id=req.request_id)
    for item in pooled:
        response.embeddings.add(index=item.index, values=embedding_of(item))
    response.usage.prompt_tokens = sum(request.num_prompt_tokens for request in requests)
    return response
