"""`/v1/responses` (OpenAI's Responses API): create, retrieve, cancel, delete.

Create translates the request onto the chat pipeline (`run_chat`, what /v1/chat/completions
runs) and its chat output back into a response; the store keeps finished responses for
retrieval and `previous_response_id`. Only foreground responses run, so a stored response has
always finished: cancelling one is refused as the reference server refuses a synchronous one.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rest_bridge.errors import BridgeError
from rest_bridge.responses.draft import ResponseDraft
from rest_bridge.responses.schemas import ResponsesRequest
from rest_bridge.responses.store import ResponseStore, StoredResponse
from rest_bridge.responses.stream import responses_events
from rest_bridge.responses.translate import (
    ChatMessage,
    chat_request_of,
    input_messages,
    with_responses_param,
)
from rest_bridge.routes.chat import run_chat
from rest_bridge.routes.route_context import ERROR_RESPONSES, RouteContext, use_body_request_id
from rest_bridge.sse import SSEResponse

logger = logging.getLogger("rest_bridge.requests")

router = APIRouter()

_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}}


@router.post("/v1/responses", responses=_STREAM_RESPONSES)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    use_body_request_id(request, body.request_id)
    ctx = RouteContext.of(request)
    if body.model_extra:
        logger.warning("request %s to /v1/responses: ignoring unknown fields %s",
                       ctx.request_id, ", ".join(sorted(body.model_extra)))
    store = store_of(request)
    history: list[ChatMessage] = []
    if body.previous_response_id is not None:
        history = _stored(store, body.previous_response_id, "previous_response_id").conversation
    turn_input = input_messages(body)
    chat = chat_request_of(body, [*history, *turn_input])
    try:
        run = await run_chat(chat, request)
    except BridgeError as error:
        raise with_responses_param(error) from None
    draft = ResponseDraft(body, run.meta.model, history, turn_input)

    def keep(done: ResponseDraft) -> None:
        if body.store:
            store.put(done.to_dict(), done.conversation())

    if run.frames is not None:
        return SSEResponse(responses_events(draft, run.frames, keep))
    assert run.body is not None
    choice = run.body["choices"][0]
    draft.output.feed_message(choice["message"])
    draft.output.finish()
    draft.finish(choice.get("finish_reason"), run.body.get("usage"))
    keep(draft)
    return JSONResponse(draft.to_dict())


@router.get("/v1/responses/{response_id}", responses=ERROR_RESPONSES)
async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
    return JSONResponse(_stored(store_of(request), response_id, "response_id").response)


@router.post("/v1/responses/{response_id}/cancel", responses=ERROR_RESPONSES)
async def cancel_response(response_id: str, request: Request) -> JSONResponse:
    _stored(store_of(request), response_id, "response_id")
    raise BridgeError("Cannot cancel a synchronous response.", http_status=400,
                      error_type="invalid_request_error", param="response_id")


@router.delete("/v1/responses/{response_id}", responses=ERROR_RESPONSES)
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    store = store_of(request)
    _stored(store, response_id, "response_id")
    store.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.api_route("/v1/responses/{response_id}", methods=["POST", "PUT", "PATCH", "OPTIONS"],
                  include_in_schema=False)
async def other_method(response_id: str, request: Request) -> JSONResponse:
    """GET and DELETE are two routes of one path, and Starlette's 405 would name only the
    first one's method in `Allow`: this route names both."""
    raise BridgeError(f"method {request.method} is not allowed on {request.url.path}",
                      http_status=405, headers={"Allow": "DELETE, GET"})


def store_of(request: Request) -> ResponseStore:
    """The app's one store, sized by --responses-store-size, made on first use."""
    state = request.app.state
    store: ResponseStore | None = getattr(state, "responses_store", None)
    if store is None:
        store = state.responses_store = ResponseStore(
            state.settings.chat.responses_store_size)
    return store


def _stored(store: ResponseStore, response_id: str, param: str) -> StoredResponse:
    entry = store.get(response_id)
    if entry is None:
        raise BridgeError(f"Response with id '{response_id}' not found.", http_status=404,
                          error_type="invalid_request_error", param=param)
    return entry
