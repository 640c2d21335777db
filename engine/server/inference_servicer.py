"""protoserve.v1.Inference: Generate (server streaming) and Embed."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from engine.errors import EngineError, UnsupportedError
from engine.generation import GenerationFinished, GenerationStarted
from engine.server.context import REQUEST_ID_KEY, EngineHandle, abort_for, request_id_from
from engine.server.proto_convert import event_to_pb, generate_request_from_pb
from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, handle: EngineHandle) -> None:
        self.handle = handle

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        request_id = request_id_from(context, request.request_id)
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        usage = common_pb2.Usage()
        try:
            engine = self.handle.get(request.model)
            generation = generate_request_from_pb(request, request_id)
            async for event in engine.loop.generate(generation):
                if isinstance(event, GenerationStarted):
                    usage.prompt_tokens = len(event.prompt_token_ids)
                    usage.cached_tokens = event.num_cached_tokens
                elif isinstance(event, GenerationFinished):
                    usage.completion_tokens += event.num_output_tokens
                yield event_to_pb(event, request.return_prompt_token_ids)
        except EngineError as error:
            await abort_for(context, error, request_id)
            return
        except Exception as error:  # noqa: BLE001 - mapped to INTERNAL, logged
            await abort_for(context, error, request_id)
            return
        yield inference_pb2.GenerateResponse(usage=usage)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        request_id = request_id_from(context, request.request_id)
        try:
            self.handle.get(request.model)
            raise UnsupportedError(
                "this server serves a generative model; embeddings need an embedding model"
            )
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error, request_id)
            raise  # unreachable: abort raises
