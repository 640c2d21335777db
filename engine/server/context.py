"""Shared plumbing of the servicers: the engine handle (None while the model loads), request
ids from metadata, and turning engine errors into rich gRPC statuses."""
from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine.frontend.served_model import Engine
from engine.errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
)
from engine.server.admission import RequestMemoryLedger
from engine.server.request_tracker import ServingOptions
from engine.server.status import engine_error_status, shorten, to_rpc_status
from protoserve.serving_metrics import ServingMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# A request id goes back out in response metadata, error details and log lines: printable
# ASCII (what an HTTP/2 header value may hold) and short, or the request is refused.
MAX_REQUEST_ID_LEN = 256
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")


@dataclass
class EngineHandle:
    """Set once the model is loaded; servicers answer UNAVAILABLE until then."""

    engine: Engine | None = None
    # `--embedding-model`: served beside `engine`, picked by name or for unnamed Embed calls.
    embedding_engine: Engine | None = None
    draining: bool = False
    options: ServingOptions = field(default_factory=ServingOptions)
    metrics: ServingMetrics | None = None
    # Host memory reserved by the requests in flight, against options.max_request_memory.
    request_memory: RequestMemoryLedger = field(default_factory=RequestMemoryLedger)
    # An OpenTelemetry tracer when --otlp-traces-endpoint is set (Generate spans), else None.
    tracer: Any = None
    # Set by SIGTERM/SIGINT or Admin/Drain; engine-serve then drains and exits.
    shutdown_requested: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the step thread dies or hangs; engine-serve exits non-zero unless kept alive.
    engine_died: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def engines(self) -> list[Engine]:
        """Every loaded engine, the default (generation or first) one first."""
        return [e for e in (self.engine, self.embedding_engine) if e is not None]

    def get(self, model: str = "", task: str | None = None) -> Engine:
        """The engine serving `model` (empty: the default one for `task`). A named model
        that cannot do `task` is INVALID_ARGUMENT naming `model`."""
        engine = self.engine
        if engine is None:
            raise EngineUnavailableError("the model is still loading")
        if self.draining:
            draining = EngineUnavailableError("the server is shutting down", reason="DRAINING")
            draining.retry_after_s = 1.0  # RetryInfo: clients retry on another replica
            raise draining
        side = self.embedding_engine
        if side is not None and (side.resolve_model_name(model) if model else task == "embed"):
            engine = side
        if not engine.loop.is_alive:
            raise EngineUnavailableError("the engine is not running", reason="ENGINE_DEAD")
        if not engine.resolve_model_name(model):
            served = [name for e in self.engines for name in e.model.names]
            raise ModelNotFoundError(
                f"model {shorten(model, 100)!r} is not served here; served: {', '.join(served)}",
                field="model",
            )
        if task == "generate" and engine.task != "generate":
            raise InvalidRequestError(
                f"model {engine.model.names[0]!r} is an embedding model and cannot generate",
                field="model",
                reason="TASK_NOT_SUPPORTED",
            )
        return engine


def request_id_from(context: grpc.aio.ServicerContext, body_request_id: str = "") -> str:
    """The body's request_id, else the x-request-id metadata, else a fresh one. A client's id
    that cannot be echoed safely is InvalidRequestError naming where it came from."""
    if body_request_id:
        return _checked_request_id(body_request_id, "request_id")
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return _checked_request_id(str(value), REQUEST_ID_KEY)
    return uuid.uuid4().hex


def _checked_request_id(request_id: str, field: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequestError(
            f"{field} is {len(request_id)} characters long; at most {MAX_REQUEST_ID_LEN}",
            field=field)
    if not _PRINTABLE_ASCII.fullmatch(request_id):
        raise InvalidRequestError(
            f"{field} must be printable ASCII (no control or non-ASCII characters)", field=field)
    return request_id


async def abort_for(
    context: grpc.aio.ServicerContext, error: BaseException, request_id: str | None = None
) -> None:
    """End the RPC with the status that matches `error` (never leaks a traceback)."""
    if isinstance(error, EngineError):
        status = engine_error_status(error, request_id)
    else:
        logger.exception("internal error in request %s", request_id, exc_info=error)
        status = to_rpc_status(
            grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}",
            reason="INTERNAL", request_id=request_id,
        )
    await context.abort_with_status(status)
