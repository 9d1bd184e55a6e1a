"""Model lifecycle for apps and scripts: what is cached, what is loaded, switch the active model."""

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from api.deps import RuntimeDep
from api.routers.models import model_card

router = APIRouter(prefix="/api/models", tags=["manage"])


class SwitchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str


@router.get("/list")
def list_models(runtime: RuntimeDep) -> dict:
    loaded = runtime.loaded.entry.key if runtime.loaded else None
    cards = [
        {**model_card(e), "format": e.format, "architecture": e.architecture, "parameters": e.parameters,
         "quantization": e.quantization, "size_bytes": e.size_bytes, "loaded": e.key == loaded}
        for e in runtime.store.entries()
    ]
    return {"object": "list", "data": cards}


@router.get("/status")
def status(runtime: RuntimeDep) -> dict:
    return runtime.status()


@router.post("/switch")
async def switch(body: SwitchRequest, runtime: RuntimeDep) -> dict:
    entry = runtime.resolve(body.model)
    await asyncio.to_thread(runtime.preload, entry)
    return runtime.status()
