"""Typed dependencies: the runtime is injected, so tests and the app can hand in their own."""

from typing import Annotated

from fastapi import Depends, Request

from runtime.engine import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
