"""What every generation route needs: the engine client, settings, request id, response meta."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import Request

from rest_bridge.engine_client import EngineClient
from rest_bridge.errors import invalid_request
from rest_bridge.middleware import is_valid_request_id
from rest_bridge.openai_schemas.engine_rules import UNSTATED_RULES
from rest_bridge.openai_schemas.request_fields import SamplingFields
from rest_bridge.openai_schemas.responses import ErrorResponse
from rest_bridge.settings import BridgeSettings
from rest_bridge.translate.proto_to_openai import ResponseMeta

logger = logging.getLogger("rest_bridge.requests")

# For the OpenAPI document: every error a generation route can answer has the envelope shape;
# the 400 also lists the rules the request schemas cannot state.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 499, 500, 501, 503, 504)
}
ERROR_RESPONSES[400]["description"] = (
    f"Invalid request (the error names the field). {UNSTATED_RULES}")

# Model-name lookups for responses must never hold a request up for long.
_MODEL_NAME_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class RouteContext:
    client: EngineClient
    settings: BridgeSettings
    request_id: str

    @classmethod
    def of(cls, request: Request) -> RouteContext:
        return cls(
            client=request.app.state.engine_client,
            settings=request.app.state.settings,
            request_id=request.state.request_id,
        )


def use_body_request_id(request: Request, body_request_id: str | None) -> None:
    """A body `request_id` (vLLM chat extra) names the request unless the header already did."""
    if not body_request_id or request.state.request_id_from_header:
        return
    if not is_valid_request_id(body_request_id):
        raise invalid_request(
            "request_id must be 1-256 printable ASCII characters", param="request_id"
        )
    request.state.request_id = body_request_id


def log_unknown_fields(body: SamplingFields, route: str, request_id: str) -> None:
    """Unknown fields are accepted so new OpenAI fields never break clients; say so once."""
    if body.model_extra:
        logger.warning(
            "request %s to %s: ignoring unknown fields %s",
            request_id,
            route,
            ", ".join(sorted(body.model_extra)),
        )


async def response_meta(ctx: RouteContext, id_prefix: str, model: str | None) -> ResponseMeta:
    """The response names the model's first served name, whichever of its names (or none)
    the client asked for, so clients see one stable id."""
    name = model or ""
    try:
        if name:
            name = await ctx.client.model_id_for(name, timeout=_MODEL_NAME_TIMEOUT_S)
        else:
            name = await ctx.client.default_model_id(timeout=_MODEL_NAME_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        logger.warning("could not learn the served model name: %s", error.details())
    return ResponseMeta(id=f"{id_prefix}-{ctx.request_id}", created=int(time.time()), model=name)


def stream_usage_flags(body: SamplingFields) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) from stream_options."""
    options = body.stream_options
    if options is None:
        return False, False
    include = bool(options.include_usage)
    return include, include and bool(options.continuous_usage_stats)

