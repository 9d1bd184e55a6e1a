"""Every error leaves the API as an OpenAI envelope: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from errors import ContextLengthExceededError, ImpetusError, ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_domain_error(exc: Exception) -> tuple[int, dict]:
    """HTTP status and envelope for an error raised by the runtime or converters."""
    if isinstance(exc, ModelNotFoundError):
        return 404, error_body(str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthExceededError):
        return 400, error_body(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ModelLoadError):
        return 503, error_body(str(exc), type_="server_error", code="model_load_failed")
    if isinstance(exc, ImpetusError):
        return 400, error_body(str(exc))
    log.error("internal error: %r", exc)
    return 500, error_body(f"internal error: {exc}", type_="server_error")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type_=kind), status_code=exc.status_code)

    @app.exception_handler(ImpetusError)
    @app.exception_handler(Exception)
    async def domain_error(_: Request, exc: Exception) -> JSONResponse:
        status, body = describe_domain_error(exc)
        return JSONResponse(body, status_code=status)
