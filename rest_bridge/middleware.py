"""Pure ASGI middleware (no BaseHTTPMiddleware, which breaks streaming and disconnects):
request ids and the optional API key.

The runtime LoRA routes change what the server serves, so where the engine has an operators'
key (`--admin-api-key`) they take that key instead of the client key: the bridge holds only
its SHA-256 (the key itself stays out of the bridge's process, which never needs it for
anything else), accepts a caller presenting it on those routes, and forwards the caller's key
to the engine's Admin service, which checks it again. A client key there gets the engine's
refusal naming the admin key (401), as on gRPC."""
from __future__ import annotations

import hashlib
import hmac
import json
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rest_bridge.anthropic.errors import anthropic_error_bytes, is_anthropic_path
from rest_bridge.errors import error_envelope

REQUEST_ID_HEADER = "x-request-id"
# gRPC metadata values must be printable ASCII; ids beyond this length are surely a mistake.
_MAX_REQUEST_ID_LENGTH = 256
_PROTECTED_PREFIX = "/v1"
# Outside /v1 but they run the model's tokenizer for the caller, so the key covers them too.
_PROTECTED_PATHS = frozenset({"/tokenize", "/detokenize"})
# Routes that call the engine's Admin service (rest_bridge/routes/lora_adapters.py).
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
# scope["state"] key of the caller's admin key, set only on ADMIN_PATHS when it matched.
ADMIN_KEY_STATE = "admin_key"
_KEY_REQUIRED_MESSAGE = ("a valid API key is required (Authorization: Bearer <key>, or "
                         "x-api-key: <key>)")


def fresh_request_id() -> str:
    return uuid.uuid4().hex


def is_valid_request_id(value: str) -> bool:
    return 0 < len(value) <= _MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()


class RequestContextMiddleware:
    """Gives each HTTP request an id and checks the bearer key.

    The id comes from the `X-Request-Id` header or is a fresh uuid4 hex. It is stored in
    `scope["state"]["request_id"]`, where a route may still replace it (chat's body
    `request_id`), and echoed in the `X-Request-Id` response header.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None,
                 admin_key_sha256: str | None = None) -> None:
        """`admin_key_sha256`: hex SHA-256 of the engine's admin key (None: it has none)."""
        self.app = app
        self._api_key = api_key
        self._admin_digest = (bytes.fromhex(admin_key_sha256)
                              if admin_key_sha256 is not None else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        state = scope.setdefault("state", {})
        header_id = headers.get(REQUEST_ID_HEADER)
        state["request_id"] = fresh_request_id()
        state["request_id_from_header"] = header_id is not None

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = state["request_id"]
            await send(message)

        if header_id is not None:
            if not is_valid_request_id(header_id):
                await _send_error(send_with_request_id, 400, "X-Request-Id must be 1-256 "
                                  "printable ASCII characters", "invalid_request_error",
                                  param="X-Request-Id")
                return
            state["request_id"] = header_id
        if self._admin_digest is not None and _route_path(scope) in ADMIN_PATHS:
            presented = _presented_key(headers)
            if presented is not None and hmac.compare_digest(
                    hashlib.sha256(presented.encode()).digest(), self._admin_digest):
                state[ADMIN_KEY_STATE] = presented
                await self.app(scope, receive, send_with_request_id)
                return
        if self._api_key is not None and not self._authorized(scope, headers):
            if is_anthropic_path(_route_path(scope)):
                await _send_json(send_with_request_id, 401, anthropic_error_bytes(
                    _KEY_REQUIRED_MESSAGE, 401))
                return
            await _send_error(send_with_request_id, 401, _KEY_REQUIRED_MESSAGE,
                              "authentication_error")
            return
        await self.app(scope, receive, send_with_request_id)

    def _authorized(self, scope: Scope, headers: Headers) -> bool:
        path = _route_path(scope)
        # Health and liveness stay open for probes; CORS preflights carry no credentials.
        protected = path.startswith(_PROTECTED_PREFIX) or path in _PROTECTED_PATHS
        if not protected or scope.get("method") == "OPTIONS":
            return True
        assert self._api_key is not None
        key = self._api_key.encode()
        # Anthropic's clients send the key as x-api-key; OpenAI's as a bearer token.
        api_key_header = headers.get("x-api-key")
        if api_key_header is not None and hmac.compare_digest(api_key_header.strip().encode(),
                                                              key):
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)


def _presented_key(headers: Headers) -> str | None:
    """The caller's key: x-api-key (Anthropic's clients) or the bearer token."""
    api_key_header = headers.get("x-api-key")
    if api_key_header is not None:
        return api_key_header.strip()
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _route_path(scope: Scope) -> str:
    """The request path below the app's root path."""
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    return path


async def _send_error(
    send: Send, status: int, message: str, error_type: str, *, param: str | None = None
) -> None:
    envelope = error_envelope(message, error_type, param=param)
    await _send_json(send, status, json.dumps(envelope, separators=(",", ":")).encode("utf-8"))


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
