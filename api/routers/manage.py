"""Model lifecycle for apps and scripts: cached and resident models, switching, uploads."""

import asyncio
import shutil

from fastapi import APIRouter, Request

from api.deps import CatalogDep, ConversionsDep, RuntimeDep, SettingsDep
from api.routers.models import model_card
from api.schemas import BudgetRequest, SwitchRequest
from api.uploads import receive_upload
from settings import DEFAULT_MODEL_ALIAS

router = APIRouter(prefix="/api/models", tags=["manage"])


@router.get("/list")
def list_models(runtime: RuntimeDep) -> dict:
    resident = {r["key"]: r for r in runtime.residency.describe()}
    active = runtime.loaded.entry.key if runtime.loaded else None
    cards = [
        {**model_card(e), "format": e.format, "architecture": e.architecture, "parameters": e.parameters,
         "quantization": e.quantization, "size_bytes": e.size_bytes, "loaded": e.key == active,
         "resident": e.key in resident, "pinned": resident.get(e.key, {}).get("pinned", False)}
        for e in runtime.store.entries()
    ]
    return {"object": "list", "data": cards}


@router.get("/status")
def status(runtime: RuntimeDep, conversions: ConversionsDep) -> dict:
    return {**runtime.status(), "conversions": {"started": conversions.started, "converted": conversions.converted}}


@router.post("/switch")
async def switch(body: SwitchRequest, runtime: RuntimeDep, catalog: CatalogDep, conversions: ConversionsDep) -> dict:
    ref = catalog.locate(body.model)
    entry = ref.entry or await conversions.ensure(ref.source)
    await asyncio.to_thread(runtime.preload, entry, body.pin, body.keep_alive)
    runtime.aliases[DEFAULT_MODEL_ALIAS] = entry.id
    return runtime.status()


@router.post("/budget")
async def budget(body: BudgetRequest, runtime: RuntimeDep) -> dict:
    """Change how much memory resident models may take together; unloads the least recently used to fit."""
    await asyncio.to_thread(runtime.set_budget, body.bytes)
    return runtime.status()


@router.post("/unload")
async def unload(body: SwitchRequest, runtime: RuntimeDep) -> dict:
    await asyncio.to_thread(runtime.unload, runtime.resolve(body.model))
    return runtime.status()


@router.post("/upload")
async def upload(request: Request, runtime: RuntimeDep, settings: SettingsDep, conversions: ConversionsDep) -> dict:
    """A model file as multipart field `file`, at most IMPETUS_UPLOAD_MAX_BYTES, converted into the cache."""
    saved = await receive_upload(request, settings.uploads_dir, settings.upload_max_bytes)
    try:
        entry = await conversions.ensure(saved)
    finally:
        shutil.rmtree(saved.parent, ignore_errors=True)  # the cache entry holds everything needed
    return model_card(entry)
