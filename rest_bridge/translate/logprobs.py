"""TokenLogprobs events -> the two OpenAI logprob shapes (completions and chat) and vLLM's
prompt_logprobs."""
from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from typing import Any

from protoserve.v1 import inference_pb2

# JSON has no infinities: impossible tokens (logprob -inf) are reported with this floor.
LOGPROB_FLOOR = -9999.0


def finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


class CompletionLogprobsBuilder:
    """Accumulates the completion shape `{text_offset, token_logprobs, tokens, top_logprobs}`.

    `text_offset` counts characters from the start of the choice's text, so it starts after
    the echoed prompt when echo is on.
    """

    def __init__(self, start_offset: int = 0) -> None:
        self._offset = start_offset
        self.text_offset: list[int] = []
        self.token_logprobs: list[float | None] = []
        self.tokens: list[str] = []
        self.top_logprobs: list[dict[str, float] | None] = []

    def extend_echoed_prompt(
        self, prompt_text: str, entries: Iterable[inference_pb2.TokenLogprobs]
    ) -> None:
        """The echoed prompt's tokens: nothing predicts the first (logprob None); its text is
        what the later tokens' texts leave of the prompt text."""
        entries = list(entries)
        if not entries:
            return
        scored = entries[1:]
        rest = sum(len(entry.chosen.token) for entry in scored)
        first = prompt_text[: max(len(prompt_text) - rest, 0)]
        self.text_offset.append(self._offset)
        self.token_logprobs.append(None)
        self.tokens.append(first)
        self.top_logprobs.append(None)
        self._offset += len(first)
        self.extend(scored)

    def extend(self, entries: Iterable[inference_pb2.TokenLogprobs]) -> None:
        for entry in entries:
            token = entry.chosen.token
            logprob = finite_logprob(entry.chosen.logprob)
            self.text_offset.append(self._offset)
            self.token_logprobs.append(logprob)
            self.tokens.append(token)
            # As the reference server (and OpenAI's legacy completions): the chosen token
            # first, then the top alternatives, so `logprobs=N` gives up to N + 1 entries and
            # `logprobs=0` still one, the chosen token's. Keyed by text: tokens that decode
            # alike share a key, the later value winning, as there.
            top = {token: logprob}
            top.update((alt.token, finite_logprob(alt.logprob)) for alt in entry.top)
            self.top_logprobs.append(top)
            self._offset += len(token)

    @property
    def next_offset(self) -> int:
        """The text_offset the next token would get."""
        return self._offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_offset": self.text_offset,
            "token_logprobs": self.token_logprobs,
            "tokens": self.tokens,
            "top_logprobs": self.top_logprobs,
        }


def chat_logprob_entries(entries: Iterable[inference_pb2.TokenLogprobs]) -> list[dict[str, Any]]:
    """The chat shape: one `{token, logprob, bytes, top_logprobs}` per generated token."""
    return [
        {
            **_chat_token(entry.chosen),
            "top_logprobs": [_chat_token(alt) for alt in entry.top],
        }
        for entry in entries
    ]


def _chat_token(logprob: inference_pb2.TokenLogprob) -> dict[str, Any]:
    return {
        "token": logprob.token,
        "logprob": finite_logprob(logprob.logprob),
        "bytes": list(logprob.token.encode("utf-8")),
    }


def prompt_logprobs_list(
    entries: Iterable[inference_pb2.TokenLogprobs],
) -> list[dict[str, Any] | None]:
    """vLLM's prompt_logprobs: None for the first prompt token (nothing predicts it), then a
    map from token id (as a string key) to `{logprob, rank, decoded_token}` per position."""
    result: list[dict[str, Any] | None] = []
    for entry in entries:
        if not entry.HasField("chosen"):
            result.append(None)
            continue
        position: dict[str, Any] = {}
        for logprob in (entry.chosen, *entry.top):
            position.setdefault(
                str(logprob.token_id),
                {
                    "logprob": finite_logprob(logprob.logprob),
                    "rank": logprob.rank,
                    "decoded_token": logprob.token,
                },
            )
        result.append(position)
    return result


async def with_token_id_labels(
    events: AsyncGenerator[inference_pb2.GenerateResponse, None],
) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
    """`events` with every logprob token text replaced by "token_id:<id>"; closing this
    generator closes (and so cancels) the underlying call."""
    async with aclosing(events):
        async for event in events:
            kind = event.WhichOneof("event")
            if kind == "delta":
                _label_with_ids(event.delta.logprobs)
            elif kind == "started":
                _label_with_ids(event.started.prompt_logprobs)
            yield event


def _label_with_ids(entries: Iterable[inference_pb2.TokenLogprobs]) -> None:
    for entry in entries:
        if not entry.HasField("chosen"):
            continue  # the first prompt position: nothing to label (and no field to create)
        for logprob in (entry.chosen, *entry.top):
            logprob.token = f"token_id:{logprob.token_id}"
