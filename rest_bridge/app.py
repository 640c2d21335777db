"""The FastAPI application: routes, error handlers, middleware and the engine channel."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rest_bridge.engine_client import EngineClient
from rest_bridge.error_handlers import install_error_handlers
from rest_bridge.middleware import RequestContextMiddleware
from rest_bridge.routes import chat, completions, health, models
from rest_bridge.settings import BridgeSettings

logger = logging.getLogger(__name__)


def create_app(settings: BridgeSettings) -> FastAPI:
    """Build the bridge. The gRPC channel opens when the app starts (lifespan) and closes at
    shutdown, which also cancels any engine call still running."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = EngineClient(settings.engine_address)
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
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, api_key=settings.api_key)
    for router in (completions.router, chat.router, models.router, health.router):
        app.include_router(router)
    return app
