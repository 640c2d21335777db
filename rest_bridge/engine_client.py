"""Async gRPC client of the engine: one channel per bridge process, reused by every request."""
from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protoserve.v1 import (
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

INFERENCE_SERVICE = "protoserve.v1.Inference"
REQUEST_ID_METADATA_KEY = "x-request-id"

# Large prompts (token-id lists, long chats) must not trip gRPC's 4 MiB default.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # Keep the HTTP/2 connection warm between bursts of requests.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


class EngineClient:
    """Calls the engine's Inference, Discovery, Tokenizer and Health services.

    Must be created inside the running event loop (grpc.aio binds the channel to it); `close()`
    ends every call still in flight.
    """

    def __init__(self, engine_address: str) -> None:
        self._channel = grpc.aio.insecure_channel(engine_address, options=_CHANNEL_OPTIONS)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._discovery = discovery_pb2_grpc.DiscoveryStub(self._channel)
        self._tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # The served name reported for requests that name no model; learnt once.
        self._default_model_id: str | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        *,
        request_id: str,
        timeout: float | None,
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """Stream the events of one Generate call.

        Closing the iterator early, or cancelling the task that iterates it, cancels the gRPC
        call, which makes the engine abort the request and free its KV blocks. Engine errors
        surface as `grpc.aio.AioRpcError`.
        """
        call = self._inference.Generate(
            request,
            metadata=((REQUEST_ID_METADATA_KEY, request_id),),
            timeout=timeout,
        )
        try:
            async for response in call:
                yield response
        finally:
            # A no-op once the call has ended; otherwise this is the abort signal.
            call.cancel()

    async def list_models(self, *, timeout: float | None) -> list[discovery_pb2.ModelInfo]:
        response = await self._discovery.ListModels(
            discovery_pb2.ListModelsRequest(), timeout=timeout
        )
        return list(response.models)

    async def default_model_id(self, *, timeout: float | None) -> str:
        """The engine's default (first) model name; raises AioRpcError when unreachable."""
        if self._default_model_id is None:
            models = await self.list_models(timeout=timeout)
            self._default_model_id = models[0].id if models else ""
        return self._default_model_id

    async def detokenize(self, model: str, token_ids: list[int], *, timeout: float | None) -> str:
        response = await self._tokenizer.Detokenize(
            tokenizer_pb2.DetokenizeRequest(model=model, token_ids=token_ids), timeout=timeout
        )
        return response.text

    async def check_ready(self, *, timeout: float) -> bool:
        """True when the engine's health service reports the Inference service SERVING."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING
