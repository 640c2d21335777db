"""The FastAPI application: routes, error handlers, middleware and the engine channel."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from protoserve.tracing import init_tracer
from rest_bridge.anthropic import route as anthropic_messages
from rest_bridge.body_limit import BodyLimitMiddleware
from rest_bridge.engine_client import EngineClient
from rest_bridge.error_handlers import install_error_handlers
from rest_bridge.http_options import install_cors
from rest_bridge.middleware import RequestContextMiddleware
from rest_bridge.responses import route as responses_routes
from rest_bridge.metrics import BridgeMetrics
from rest_bridge.routes import (
    chat, completions, embeddings, health, lora_adapters, metrics, models, render,
)
from rest_bridge.routes import kv_events as kv_events_routes
from rest_bridge.routes import scoring
from rest_bridge.routes import tokenize as tokenize_routes
from rest_bridge.settings import BridgeSettings
from rest_bridge.tracing import TraceContextMiddleware

logger = logging.getLogger(__name__)


def create_app(settings: BridgeSettings) -> FastAPI:
    """Build the bridge. The gRPC channel opens when the app starts (lifespan) and closes at
    shutdown, which also cancels any engine call still running."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = EngineClient(settings.engine_address, api_key=settings.engine_api_key)
        client.metrics = app.state.metrics
        app.state.engine_client = client
        logger.info("bridge forwarding to the engine at %s", settings.engine_address)
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(
        title="protoserve OpenAI bridge",
        summary="OpenAI-compatible REST API over the protoserve gRPC engine",
        lifespan=lifespan,
        # Clients that omit Content-Type (common with curl) still send JSON.
        strict_content_type=False,
        docs_url=None if settings.disable_docs else "/docs",
        redoc_url=None if settings.disable_docs else "/redoc",
        openapi_url=None if settings.disable_docs else "/openapi.json",
    )
    app.state.settings = settings
    app.state.metrics = BridgeMetrics(compat=settings.metrics_compat)
    install_error_handlers(app)
    # Inside the request-id middleware, so 413/400 answers carry X-Request-Id too.
    app.add_middleware(BodyLimitMiddleware)
    # Inside it too, so the bridge's span can name the request id.
    app.add_middleware(TraceContextMiddleware,
                       tracer=init_tracer("protoserve-bridge", settings.otlp_traces_endpoint))
    app.add_middleware(RequestContextMiddleware, api_key=settings.api_key,
                       admin_key_sha256=settings.admin_key_sha256)
    # Last added = outermost: preflights are answered before the API-key check.
    install_cors(app, settings.allowed_origins, allow_credentials=settings.allow_credentials,
                 methods=settings.allowed_methods, headers=settings.allowed_headers)
    for router in (completions.router, chat.router, render.router, embeddings.router,
                   scoring.router, models.router, health.router, metrics.router,
                   lora_adapters.router):
        app.include_router(router)
    app.include_router(tokenize_routes.router)
    app.include_router(kv_events_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(anthropic_messages.router)
    return app
