"""Shared plumbing of the servicers: the engine handle (None while the model loads), request
ids from metadata, and turning engine errors into rich gRPC statuses."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import grpc

from engine.engine import Engine
from engine.errors import EngineError, EngineUnavailableError, ModelNotFoundError
from engine.server.status import engine_error_status, to_rpc_status

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"


@dataclass
class EngineHandle:
    """Set once the model is loaded; servicers answer UNAVAILABLE until then."""

    engine: Engine | None = None
    draining: bool = False

    def get(self, model: str = "") -> Engine:
        engine = self.engine
        if engine is None:
            raise EngineUnavailableError("the model is still loading")
        if self.draining:
            raise EngineUnavailableError("the server is shutting down", reason="DRAINING")
        if not engine.loop.is_alive:
            raise EngineUnavailableError("the engine is not running", reason="ENGINE_DEAD")
        if not engine.resolve_model_name(model):
            raise ModelNotFoundError(
                f"model {model!r} is not served here; served: {', '.join(engine.model.names)}",
                field="model",
            )
        return engine


def request_id_from(context: grpc.aio.ServicerContext, body_request_id: str = "") -> str:
    if body_request_id:
        return body_request_id
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)
    return uuid.uuid4().hex


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
