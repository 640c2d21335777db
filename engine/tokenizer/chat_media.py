"""Media content parts (images, audio) against what the served model accepts.

Every model this engine serves is text-only, so any media part is refused with a clear error
before anything is fetched or decoded: a hostile upload costs the engine nothing beyond the
gRPC message it arrived in (whose size the server caps).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import InvalidRequestError

# Content part type -> the kind of input it carries.
MEDIA_PART_KINDS = {"image_url": "image", "audio_url": "audio", "input_audio": "audio"}


def reject_media_parts(messages: list[dict[str, Any]], model_name: str) -> None:
    """Raise InvalidRequestError naming the first media part; the model takes text only."""
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for part_index, part in enumerate(content):
            kind = MEDIA_PART_KINDS.get(part.get("type")) if isinstance(part, Mapping) else None
            if kind is not None:
                raise InvalidRequestError(
                    f"model {model_name!r} does not accept {kind} input "
                    f"(messages[{index}].content[{part_index}])",
                    field="messages",
                    reason="UNSUPPORTED_MEDIA",
                )
