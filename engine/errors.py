"""Errors the engine raises toward its servers; server/ maps each kind to one gRPC status."""
from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    UNIMPLEMENTED = "unimplemented"
    FAILED_PRECONDITION = "failed_precondition"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class EngineError(Exception):
    """An error with a kind (-> status code), an optional request field it concerns, and a
    machine-readable reason (-> google.rpc.ErrorInfo.reason)."""

    kind = ErrorKind.INTERNAL
    reason = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if reason is not None:
            self.reason = reason


class InvalidRequestError(EngineError):
    """The request is malformed or a value is out of range; `field` names the culprit."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class ContextLengthError(InvalidRequestError):
    reason = "CONTEXT_LENGTH_EXCEEDED"


class ModelNotFoundError(EngineError):
    kind = ErrorKind.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class EngineUnavailableError(EngineError):
    kind = ErrorKind.UNAVAILABLE
    reason = "ENGINE_UNAVAILABLE"


class DeadlineExceededError(EngineError):
    """The request's deadline expired while it was queued or decoding; it was aborted."""

    kind = ErrorKind.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class QueueFullError(EngineError):
    """Too many requests wait for admission; the client should retry after `retry_after_s`."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"
    retry_after_s = 1.0


class SlowConsumerError(EngineError):
    """A streaming client stopped reading; its request is cancelled to bound its buffer."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "SLOW_CONSUMER"


class UnsupportedError(EngineError):
    kind = ErrorKind.UNIMPLEMENTED
    reason = "UNSUPPORTED"


class FailedPreconditionError(EngineError):
    """Valid, but the server is not set up for it (e.g. a feature left off at start-up)."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ModelLoadError(Exception):
    """The model directory cannot be served (missing files, unsupported architecture).
    Start-up prints its message as one line and exits non-zero."""
