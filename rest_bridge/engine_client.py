"""Async gRPC client of the engine: one channel per bridge process, reused by every request."""
from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protoserve.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from rest_bridge.metrics import BridgeMetrics
from rest_bridge.tracing import engine_trace_metadata

INFERENCE_SERVICE = "protoserve.v1.Inference"
REQUEST_ID_METADATA_KEY = "x-request-id"
AUTHORIZATION_METADATA_KEY = "authorization"

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

    def __init__(self, engine_address: str, *, api_key: str | None = None) -> None:
        # Every call carries the key; the engine checks it on every service it protects.
        self._auth: tuple[tuple[str, str], ...] = (
            ((AUTHORIZATION_METADATA_KEY, f"Bearer {api_key}"),) if api_key else ()
        )
        self._channel = grpc.aio.insecure_channel(engine_address, options=_CHANNEL_OPTIONS)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._discovery = discovery_pb2_grpc.DiscoveryStub(self._channel)
        self._tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        # The served name reported for requests that name no model; learnt once.
        self._default_model_id: str | None = None
        # Served name (id or alias) -> the model's id, the name responses report.
        self._model_ids: dict[str, str] | None = None
        # Set by the app: every Generate call is recorded for /metrics.
        self.metrics: BridgeMetrics | None = None

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
            metadata=((REQUEST_ID_METADATA_KEY, request_id), *self._auth,
                      *engine_trace_metadata()),
            timeout=timeout,
        )
        tracker = self.metrics.tracker(request) if self.metrics is not None else None
        outcome: str | None = None
        try:
            async for response in call:
                if tracker is not None:
                    tracker.on_response(response)
                yield response
        except BaseException as error:
            if tracker is not None:
                outcome = tracker.fail(error)
            raise
        finally:
            if tracker is not None:
                tracker.finish(outcome)
            # A no-op once the call has ended; otherwise this is the abort signal.
            call.cancel()

    async def embed(
        self, request: inference_pb2.EmbedRequest, *, request_id: str, timeout: float | None
    ) -> inference_pb2.EmbedResponse:
        """One Embed call; cancelling the awaiting task cancels it in the engine too."""
        return await self._inference.Embed(
            request,
            metadata=((REQUEST_ID_METADATA_KEY, request_id), *self._auth,
                      *engine_trace_metadata()),
            timeout=timeout,
        )

    async def score(
        self, request: inference_pb2.ScoreRequest, *, request_id: str, timeout: float | None
    ) -> inference_pb2.ScoreResponse:
        return await self._inference.Score(request, metadata=self._unary_metadata(request_id),
                                           timeout=timeout)

    async def classify(
        self, request: inference_pb2.ClassifyRequest, *, request_id: str, timeout: float | None
    ) -> inference_pb2.ClassifyResponse:
        return await self._inference.Classify(request, metadata=self._unary_metadata(request_id),
                                              timeout=timeout)

    def _unary_metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_METADATA_KEY, request_id), *self._auth, *engine_trace_metadata())

    async def render(
        self, request: inference_pb2.GenerateRequest, *, timeout: float | None
    ) -> inference_pb2.RenderResponse:
        """What Generate would run for `request` (prompt token ids, resolved sampling),
        with the errors Generate would give; nothing is scheduled."""
        return await self._inference.Render(
            inference_pb2.RenderRequest(request=request), timeout=timeout,
            metadata=(*self._auth, *engine_trace_metadata()),
        )

    async def get_load(self, *, timeout: float) -> discovery_pb2.GetLoadResponse:
        return await self._discovery.GetLoad(
            discovery_pb2.GetLoadRequest(), timeout=timeout, metadata=self._auth
        )

    def watch_kv_events(self, model: str = "",
                        since: int | None = None) -> grpc.aio.UnaryStreamCall:
        """Discovery/WatchKvEvents: open until the caller cancels it (no deadline); `since`:
        replay from that sequence number first."""
        return self._discovery.WatchKvEvents(
            discovery_pb2.WatchKvEventsRequest(model=model, since_sequence_number=since),
            metadata=self._auth,
        )

    async def list_models(self, *, timeout: float | None) -> list[discovery_pb2.ModelInfo]:
        response = await self._discovery.ListModels(
            discovery_pb2.ListModelsRequest(), timeout=timeout, metadata=self._auth
        )
        return list(response.models)

    async def default_model_id(self, *, timeout: float | None) -> str:
        """The engine's default (first) model name; raises AioRpcError when unreachable."""
        if self._default_model_id is None:
            models = await self.list_models(timeout=timeout)
            self._default_model_id = models[0].id if models else ""
        return self._default_model_id

    async def detokenize(self, model: str, token_ids: list[int], *, timeout: float | None,
                         skip_special_tokens: bool = True) -> str:
        response = await self._tokenizer.Detokenize(
            tokenizer_pb2.DetokenizeRequest(model=model, token_ids=token_ids,
                                            skip_special_tokens=skip_special_tokens),
            timeout=timeout,
            metadata=self._auth,
        )
        return response.text

    async def tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, *, timeout: float | None
    ) -> tokenizer_pb2.TokenizeResponse:
        return await self._tokenizer.Tokenize(request, timeout=timeout, metadata=self._auth)

    async def server_version(self, *, timeout: float | None) -> str:
        response = await self._discovery.GetServerInfo(
            discovery_pb2.GetServerInfoRequest(), timeout=timeout, metadata=self._auth
        )
        return response.version

    async def model_id_for(self, name: str, *, timeout: float | None) -> str:
        """The id (first served name) of the model that `name` selects; `name` itself when
        the engine does not know it (the engine then answers NOT_FOUND to the request)."""
        if self._model_ids is None:
            ids: dict[str, str] = {}
            for info in await self.list_models(timeout=timeout):
                for served in (info.id, *info.aliases):
                    ids.setdefault(served, info.id)
            self._model_ids = ids
        return self._model_ids.get(name, name)

    async def load_lora_adapter(
        self, request: admin_pb2.LoadLoraAdapterRequest, *, timeout: float | None,
        admin_key: str | None = None,
    ) -> None:
        """Admin/LoadLoraAdapter with the caller's admin key, else the bridge's key (the
        engine's admin rules apply)."""
        await self._admin.LoadLoraAdapter(request, timeout=timeout,
                                          metadata=self._admin_auth(admin_key))
        self._model_ids = None  # served names changed: learn them again

    async def unload_lora_adapter(
        self, request: admin_pb2.UnloadLoraAdapterRequest, *, timeout: float | None,
        admin_key: str | None = None,
    ) -> None:
        await self._admin.UnloadLoraAdapter(request, timeout=timeout,
                                            metadata=self._admin_auth(admin_key))
        self._model_ids = None

    def _admin_auth(self, admin_key: str | None) -> tuple[tuple[str, str], ...]:
        if admin_key is None:
            return self._auth
        return ((AUTHORIZATION_METADATA_KEY, f"Bearer {admin_key}"),)

    async def check_ready(self, *, timeout: float) -> bool:
        """True when the engine's health service reports the Inference service SERVING."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE),
                timeout=timeout,
                metadata=self._auth,
            )
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING
