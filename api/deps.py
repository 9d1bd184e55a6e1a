"""Typed dependencies: the runtime and settings are injected, so tests and the app can hand in their own."""

from typing import Annotated

from fastapi import Depends, Request

from runtime.catalog import Catalog
from runtime.conversions import Conversions
from runtime.engine import Runtime
from settings import Settings


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def get_conversions(request: Request) -> Conversions:
    return request.app.state.conversions


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
ConversionsDep = Annotated[Conversions, Depends(get_conversions)]
