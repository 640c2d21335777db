"""In-memory store of finished responses, for GET /v1/responses/{id} and
`previous_response_id`.

Least recently used entries go first once `--responses-store-size` is reached (0 keeps none).
The bridge is one process with one event loop: no locks are needed, and a restart forgets
every response, as the reference server's in-memory store does.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_RESPONSES_STORE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class StoredResponse:
    # The response object as it was answered.
    response: dict[str, Any]
    # The conversation up to and including this response's output, as chat messages
    # (instructions left out: each turn's own instructions apply).
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_RESPONSES_STORE_SIZE) -> None:
        if capacity < 0:
            raise ValueError("--responses-store-size must be >= 0")
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        if self.capacity == 0:
            return
        response_id = response["id"]
        # Copies: the caller keeps building on its own dicts (later turns' messages).
        self._entries[response_id] = StoredResponse(copy.deepcopy(response),
                                                    copy.deepcopy(conversation))
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None
