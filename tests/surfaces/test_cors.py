"""--allowed-origins: CORS preflights are answered (before the API-key check) for listed
origins only, and real responses carry the CORS headers. Also --disable-fastapi-docs."""
from __future__ import annotations

import httpx
from surface_names import GOOD_ORIGIN
from engine_process import EngineProcess

PREFLIGHT_HEADERS = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_preflight_for_an_allowed_origin(surfaces_server: EngineProcess) -> None:
    reply = httpx.options(f"{surfaces_server.http_url}/v1/chat/completions",
                          headers={"Origin": GOOD_ORIGIN, **PREFLIGHT_HEADERS}, timeout=10)
    # 200 although no key is sent: preflights never carry credentials.
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert "POST" in reply.headers["access-control-allow-methods"]
    assert "authorization" in reply.headers["access-control-allow-headers"].lower()


def test_preflight_for_another_origin_is_refused(surfaces_server: EngineProcess) -> None:
    reply = httpx.options(f"{surfaces_server.http_url}/v1/chat/completions",
                          headers={"Origin": "http://evil.example", **PREFLIGHT_HEADERS},
                          timeout=10)
    assert reply.status_code == 400
    assert "access-control-allow-origin" not in reply.headers


def test_responses_carry_cors_headers_even_when_unauthorized(
    surfaces_server: EngineProcess,
) -> None:
    reply = httpx.get(f"{surfaces_server.http_url}/v1/models",
                      headers={"Origin": GOOD_ORIGIN}, timeout=10)
    assert reply.status_code == 401  # the browser can read why
    assert reply.headers["access-control-allow-origin"] == GOOD_ORIGIN


def test_docs_can_be_disabled(surfaces_server: EngineProcess) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{surfaces_server.http_url}{path}", timeout=10).status_code == 404
