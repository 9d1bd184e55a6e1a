"""The FastAPI application, built around an injected runtime and settings."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request

from api.announce import AnnounceGenerations
from api.errors import install_error_handlers
from api.routers import chat, completions, health, lmstudio, manage, models, system
from runtime.catalog import Catalog
from runtime.conversions import Conversions
from runtime.engine import Runtime
from settings import Settings


def require_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected and request.headers.get("authorization") != f"Bearer {expected}":
        raise HTTPException(401, "Incorrect API key provided: send it as 'Authorization: Bearer <key>'")


def create_app(runtime: Runtime, settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        runtime.close()

    app = FastAPI(title="Impetus", description="Local models through an OpenAI-compatible API", lifespan=lifespan)
    app.state.runtime = runtime
    app.state.settings = settings = settings or Settings.from_env()
    app.state.catalog = Catalog(runtime.store, runtime.aliases, settings.model_config_dirs, list(settings.model_roots))
    app.state.conversions = Conversions(runtime.store)
    install_error_handlers(app)
    app.add_middleware(AnnounceGenerations)
    app.include_router(health.router)
    for router in (models.router, chat.router, completions.router, manage.router, lmstudio.router, system.router):
        app.include_router(router, dependencies=[Depends(require_key)])
    return app
