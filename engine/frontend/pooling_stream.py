"""The asyncio-side end of one embedding request: the engine loop hands it the request's one
output (or a failure) and it forwards that, tagged with the input's index, to the queue the
Embed call awaits. Same surface as RequestStream, so the loop dispatches both alike."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from engine.errors import EngineUnavailableError
from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason


@dataclass(frozen=True, slots=True)
class PooledOutput:
    index: int
    output: RequestOutput


class PoolingStream:
    def __init__(
        self, index: int, request_id: str, client_request_id: str, events: asyncio.Queue
    ) -> None:
        self.index = index
        self.request_id = request_id
        self.client_request_id = client_request_id
        self.events = events

    def on_output(self, output: RequestOutput) -> tuple[bool, bool]:
        """Embedding requests finish with their first output. Returns (done, stopped_early)."""
        self.events.put_nowait(PooledOutput(self.index, output))
        return True, False

    def finish(self, reason: FinishReason) -> None:
        """Ended from outside the engine (admin abort): no vector will come."""
        self.events.put_nowait(PooledOutput(self.index, RequestOutput(self.request_id, [], reason)))

    def fail(self, error: BaseException) -> None:
        self.events.put_nowait(error)


def embedding_of(pooled: PooledOutput) -> list[float]:
    """The vector, or the error that explains why the request has none."""
    output = pooled.output
    if output.embedding is None or output.finish_reason != FinishReason.STOP:
        reason = output.finish_reason.value if output.finish_reason else "unknown"
        raise EngineUnavailableError(
            f"embedding of input {pooled.index} did not complete (finish reason: {reason})",
            reason="ABORTED",
        )
    return output.embedding
