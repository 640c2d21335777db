"""A typed asyncio client of the protoserve engine (grpc.aio), with cancellation and deadlines.

    async with ProtoserveClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("Once upon a time", max_tokens=32, timeout=10):
            print(chunk.text, end="")
        result = await client.complete("Hello", max_tokens=8)

Cancellation: leave the `async for` early (break, an exception, task cancellation) and the gRPC
call is cancelled; the engine aborts the request and frees its KV blocks within one step.
Deadlines: `timeout` (seconds) becomes the gRPC deadline; when it passes, the engine evicts the
request from its queue or stops decoding, and `DeadlineExceeded` is raised.

Needs grpcio, protobuf, googleapis-common-protos and the generated `protoserve.v1` stubs.
"""
from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Running from a checkout: make the repo's stubs importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protoserve.v1 import (  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

FINISH_REASONS = {value: name.removeprefix("FINISH_REASON_").lower()
                  for name, value in inference_pb2.FinishReason.items()}


class ProtoserveError(Exception):
    """An RPC failed. `reason` is google.rpc.ErrorInfo.reason (e.g. QUEUE_FULL, DRAINING);
    `retry_after_s` comes from google.rpc.RetryInfo when the server sent one."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ProtoserveError):
    pass


class Overloaded(ProtoserveError):
    """RESOURCE_EXHAUSTED (the queue is full): retry after `retry_after_s`."""


class Unavailable(ProtoserveError):
    """UNAVAILABLE: loading, draining, or the engine died; try another replica."""


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    text: str
    token_ids: list[int]


@dataclass(slots=True)
class Completion:
    request_id: str = ""
    texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return self.texts.get(0, "")


def _error(error: grpc.aio.AioRpcError) -> ProtoserveError:
    reason = retry = None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            hint = error_details_pb2.RetryInfo()
            detail.Unpack(hint)
            retry = hint.retry_delay.ToNanoseconds() / 1e9
    kind = {grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
            grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
            grpc.StatusCode.UNAVAILABLE: Unavailable}.get(error.code(), ProtoserveError)
    return kind(error.code(), error.details() or "", reason, retry)


def _request(prompt: str, options: dict[str, Any]) -> inference_pb2.GenerateRequest:
    request_id = options.pop("request_id", "")
    options.setdefault("max_tokens", 16)
    return inference_pb2.GenerateRequest(
        text=prompt, request_id=request_id, sampling=common_pb2.SamplingParams(**options))


class ProtoserveClient:
    def __init__(self, address: str, *, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        self._channel = (grpc.aio.secure_channel(address, credentials, options=options)
                         if credentials is not None
                         else grpc.aio.insecure_channel(address, options=options))
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._discovery = discovery_pb2_grpc.DiscoveryStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    async def __aenter__(self) -> ProtoserveClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str, *, timeout: float | None = None,
                       **sampling: Any) -> AsyncIterator[Chunk]:
        """Stream text chunks. Closing the iterator early cancels the request. `sampling`:
        max_tokens, temperature, n, ignore_eos, ... (SamplingParams fields), request_id."""
        request = _request(prompt, sampling)
        async for response in self._stream(request, timeout):
            if response.WhichOneof("event") == "delta":
                delta = response.delta
                yield Chunk(delta.index, delta.text, list(delta.token_ids))

    async def complete(self, prompt: str, *, timeout: float | None = None,
                       **sampling: Any) -> Completion:
        """The whole generation (all n choices); arguments as for `generate`."""
        request = _request(prompt, sampling)
        result = Completion()
        async for response in self._stream(request, timeout):
            kind = response.WhichOneof("event")
            if kind == "started":
                result.request_id = response.started.request_id
                result.prompt_tokens = response.started.prompt_tokens
            elif kind == "delta":
                index = response.delta.index
                result.texts[index] = result.texts.get(index, "") + response.delta.text
            elif kind == "finished":
                result.finish_reasons[response.finished.index] = FINISH_REASONS.get(
                    response.finished.reason, "unspecified")
                result.completion_tokens += response.finished.completion_tokens
        return result

    async def _stream(self, request: inference_pb2.GenerateRequest, timeout: float | None,
                      ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        call = self._inference.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise _error(error) from None
        finally:
            call.cancel()  # a no-op after a normal end; otherwise the abort signal

    async def get_load(self, *, timeout: float = 5.0) -> discovery_pb2.GetLoadResponse:
        try:
            return await self._discovery.GetLoad(discovery_pb2.GetLoadRequest(), timeout=timeout,
                                                 metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise _error(error) from None

    async def abort(self, request_ids: list[str], *, timeout: float = 5.0) -> list[str]:
        """Server-side abort by request id; idempotent (unknown or finished ids are ignored)."""
        try:
            reply = await self._admin.Abort(admin_pb2.AbortRequest(request_ids=request_ids),
                                            timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise _error(error) from None
        return list(reply.aborted_request_ids)
