"""Anthropic's error shape, `{"type": "error", "error": {"type", "message"}}`, for every
failure of the Anthropic routes: body validation, the chat pipeline's BridgeErrors (engine
statuses included, same HTTP statuses as the OpenAI routes) and the API-key check.

Anthropic's envelope has no `param`; the field a 400 is about leads the message instead.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from rest_bridge.error_handlers import describe_validation_errors
from rest_bridge.errors import BridgeError

logger = logging.getLogger(__name__)

ANTHROPIC_PATH_PREFIX = "/v1/messages"

# Anthropic's error types by HTTP status; statuses it has no name for fall back by class.
_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PATH_PREFIX or path.startswith(ANTHROPIC_PATH_PREFIX + "/")


def anthropic_error_type(http_status: int) -> str:
    if http_status in _ERROR_TYPES:
        return _ERROR_TYPES[http_status]
    return "api_error" if http_status >= 500 else "invalid_request_error"


def anthropic_error_body(
    message: str, http_status: int, *, param: str | None = None
) -> dict[str, Any]:
    if param and param not in message:
        message = f"{param}: {message}"
    return {"type": "error",
            "error": {"type": anthropic_error_type(http_status), "message": message}}


def anthropic_error_bytes(message: str, http_status: int) -> bytes:
    """The body for answers sent below FastAPI (the API-key middleware)."""
    body = anthropic_error_body(message, http_status)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def anthropic_error_response(error: BridgeError) -> JSONResponse:
    return JSONResponse(
        anthropic_error_body(error.message, error.http_status, param=error.param),
        status_code=error.http_status,
        headers=error.headers,
    )


class AnthropicErrorRoute(APIRoute):
    """A route whose errors leave in Anthropic's shape rather than the app-wide OpenAI one.

    FastAPI raises body validation errors inside the route handler, so catching them here
    covers everything the route itself decides; 404/405 of unknown paths stay app-wide.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                message, param = describe_validation_errors(error.errors())
                return JSONResponse(anthropic_error_body(message, 400, param=param),
                                    status_code=400)
            except BridgeError as error:
                if error.http_status >= 500:
                    logger.warning("%s %s -> %d: %s", request.method, request.url.path,
                                   error.http_status, error.message)
                return anthropic_error_response(error)
            except StarletteHTTPException as error:
                # FastAPI's own 400: a body it could not decode (e.g. invalid UTF-8).
                message = str(error.detail)
                if error.status_code == 400:
                    message += ": the body must be UTF-8 encoded JSON"
                return JSONResponse(anthropic_error_body(message, error.status_code),
                                    status_code=error.status_code,
                                    headers=getattr(error, "headers", None))
            except Exception:
                # The traceback goes to the log only; the client learns that the server failed.
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                return JSONResponse(anthropic_error_body("internal server error", 500),
                                    status_code=500)

        return handle
