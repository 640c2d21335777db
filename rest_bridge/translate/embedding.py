"""OpenAI embeddings JSON <-> protoserve.v1 EmbedRequest / EmbedResponse."""
from __future__ import annotations

import base64
import struct
from typing import Any

from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.errors import invalid_request
from rest_bridge.openai_schemas.embedding import EmbeddingRequest
from rest_bridge.translate.chat_input import chat_message_from

# Engine field names -> the OpenAI ones this route's clients sent.
INPUT_ALIASES = {"inputs": "input"}
CHAT_ALIASES = {"inputs": "messages"}


def embed_request_from(body: EmbeddingRequest, request_id: str) -> inference_pb2.EmbedRequest:
    has_input = body.input is not None
    has_messages = body.messages is not None
    if has_input == has_messages:
        raise invalid_request(
            "exactly one of input or messages is required",
            param="messages" if has_messages else "input",
        )
    pb = inference_pb2.EmbedRequest(request_id=request_id, model=body.model or "")
    if has_messages:
        pb.inputs.add().chat.CopyFrom(_chat_input(body))
    else:
        for item in _split_inputs(body.input):
            entry = pb.inputs.add()
            if isinstance(item, str):
                entry.text = item
            else:
                entry.token_ids.ids.extend(item)
    if body.dimensions is not None:
        pb.dimensions = body.dimensions
    if body.normalize is not None:
        pb.normalize = body.normalize
    if body.truncate_prompt_tokens is not None:
        pb.truncate_prompt_tokens = body.truncate_prompt_tokens
    if body.add_special_tokens is not None:
        pb.add_special_tokens = body.add_special_tokens
    pb.priority = body.priority or 0
    return pb


def _split_inputs(value: Any) -> list[str | list[int]]:
    """str -> [str]; [int, ...] -> one token-id input; lists of either -> a batch."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    return list(value)


def _chat_input(body: EmbeddingRequest) -> common_pb2.ChatInput:
    chat = common_pb2.ChatInput()
    for index, message in enumerate(body.messages or ()):
        chat.messages.append(chat_message_from(message, f"messages.{index}"))
    if body.add_generation_prompt is not None:
        chat.add_generation_prompt = body.add_generation_prompt
    if body.continue_final_message is not None:
        chat.continue_final_message = body.continue_final_message
    if body.chat_template is not None:
        chat.chat_template = body.chat_template
    if body.chat_template_kwargs:
        chat.chat_template_kwargs.update(body.chat_template_kwargs)
    return chat


def encode_base64(values: list[float]) -> str:
    """float32 little-endian bytes, base64-encoded (what OpenAI's SDKs decode)."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def embedding_body(
    reply: inference_pb2.EmbedResponse,
    *,
    response_id: str,
    created: int,
    model: str,
    encoding_format: str,
) -> dict[str, Any]:
    data = []
    for item in sorted(reply.embeddings, key=lambda e: e.index):
        values = list(item.values)
        embedding: list[float] | str = (
            encode_base64(values) if encoding_format == "base64" else values
        )
        data.append({"index": item.index, "object": "embedding", "embedding": embedding})
    prompt_tokens = reply.usage.prompt_tokens
    return {
        "id": response_id,
        "object": "list",
        "created": created,
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
