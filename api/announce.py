"""Tells the runtime about generation requests as soon as they arrive, before their bodies are read
and validated, so that an idle runtime admits requests sent together at once (one prefill for all)
instead of starting on the first while the others are still being parsed."""

from __future__ import annotations

from contextvars import ContextVar

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

pending: ContextVar = ContextVar("pending", default=None)  # this request's settle(), while it is announced


def settle() -> None:
    """This request has reached the runtime (or will not soon): stop holding others back for it."""
    if (done := pending.get()) is not None:
        done()


class AnnounceGenerations:
    """ASGI middleware: announces each generation request to the app's runtime while it is on its way."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        done = scope["app"].state.runtime.announcements.announce()
        token = pending.set(done)
        try:
            await self.app(scope, receive, send)
        finally:
            done()
            pending.reset(token)
