"""The FastAPI application, built around an injected runtime."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routers import chat, completions, health, manage, models
from runtime.engine import Runtime


def create_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        runtime.close()

    app = FastAPI(title="Impetus", description="Local models through an OpenAI-compatible API", lifespan=lifespan)
    app.state.runtime = runtime
    install_error_handlers(app)
    for router in (health.router, models.router, chat.router, completions.router, manage.router):
        app.include_router(router)
    return app
