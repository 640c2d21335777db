"""FastAPI exception handlers: every failure leaves the bridge as the OpenAI error envelope."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rest_bridge.errors import BridgeError, error_envelope, error_type_for_http

logger = logging.getLogger(__name__)

# How many pydantic errors to spell out in one message before summarising the rest.
_MAX_LISTED_ERRORS = 3


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BridgeError, _bridge_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


def bridge_error_response(error: BridgeError) -> JSONResponse:
    return JSONResponse(error.envelope(), status_code=error.http_status, headers=error.headers)


async def _bridge_error(request: Request, error: BridgeError) -> JSONResponse:
    if error.http_status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path,
                       error.http_status, error.message)
    return bridge_error_response(error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_errors(error.errors())
    return JSONResponse(
        error_envelope(message, "invalid_request_error", param=param), status_code=400
    )


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    status = error.status_code
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif status == 400:
        # FastAPI's only 400 of its own: a body it could not decode (e.g. invalid UTF-8).
        message = f"{error.detail}: the body must be UTF-8 encoded JSON"
    else:
        message = str(error.detail)
    return JSONResponse(
        error_envelope(message, error_type_for_http(status)),
        status_code=status,
        headers=getattr(error, "headers", None),
    )


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # The traceback goes to the log only; the client gets a generic envelope.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_envelope("internal server error", "server_error"), status_code=500
    )


def describe_validation_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A readable message and the offending field path (e.g. `messages.0.content`) from
    pydantic errors as FastAPI reports them (locations start with "body")."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return f"the request body is not valid JSON: {detail}", None
    if not _field_path(first) and isinstance(first.get("input"), bytes | str):
        # The body was not parsed as JSON at all (a non-JSON Content-Type).
        return "the request body must be a JSON object sent as application/json", None
    param = _param_of(errors)
    listed = [_describe(error) for error in errors[:_MAX_LISTED_ERRORS]]
    if len(errors) > _MAX_LISTED_ERRORS:
        listed.append(f"and {len(errors) - _MAX_LISTED_ERRORS} more")
    return "; ".join(listed), param


def _field_path(error: Any) -> tuple[str | int, ...]:
    location = tuple(error.get("loc", ()))
    return location[1:] if location[:1] == ("body",) else location


def _param_of(errors: Sequence[Any]) -> str | None:
    """The common path of every error about the first error's field.

    A value that matches no member of a union yields one error per member, each with the
    member's name appended to the path; their common prefix is the field itself.
    """
    first_path = _field_path(errors[0])
    if not first_path:
        return None
    related = [path for path in map(_field_path, errors) if path[:1] == first_path[:1]]
    common = list(first_path)
    for path in related[1:]:
        length = 0
        while length < min(len(common), len(path)) and common[length] == path[length]:
            length += 1
        common = common[:length]
    return ".".join(str(part) for part in common) or None


def _describe(error: Any) -> str:
    path = ".".join(str(part) for part in _field_path(error))
    message = str(error.get("msg", "invalid value"))
    return f"{path}: {message}" if path else message
