"""Server-sent events framing for OpenAI streams.

Every event is `data: <json>\\n\\n`; a stream always ends with `data: [DONE]\\n\\n`, also after
an in-stream error, which is sent as `data: {"error": {...}}` once the 200 has gone out.
"""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_DONE = b"data: [DONE]\n\n"
SSE_MEDIA_TYPE = "text/event-stream"


def sse_event(payload: dict[str, Any]) -> bytes:
    # Compact separators: chunks are sent once per token, so every byte counts.
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


def parse_sse_events(body: bytes) -> list[dict[str, Any] | str]:
    """Split an SSE body into its data payloads: dicts for JSON events, "[DONE]" as a string.

    The inverse of the framing above; raises ValueError on anything that is not a data event.
    """
    events: list[dict[str, Any] | str] = []
    for frame in body.decode("utf-8").split("\n\n"):
        if not frame:
            continue
        if not frame.startswith("data: "):
            raise ValueError(f"not an SSE data event: {frame!r}")
        data = frame[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its event generator when the response ends.

    Starlette cancels the sending task when the client disconnects, which can leave the
    generator suspended at a `yield`; closing it here runs its `finally` blocks at once, and
    those cancel the engine calls instead of waiting for garbage collection.
    """

    def __init__(
        self, events: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(
            events,
            media_type=SSE_MEDIA_TYPE,
            # Proxies (nginx) must not buffer a token stream.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
