"""LM Studio's REST shape (`/api/v0/models`), which Cline's LM Studio provider reads for context sizes."""

from fastapi import APIRouter

from api.deps import RuntimeDep
from cache.store import Entry

router = APIRouter(prefix="/api/v0", tags=["lmstudio"])


def lmstudio_card(entry: Entry, loaded_key: str | None) -> dict:
    loaded = entry.key == loaded_key
    return {
        "id": entry.id,
        "object": "model",
        "type": "llm",
        "publisher": "impetus",
        "arch": entry.architecture,
        "compatibility_type": "mlx",
        "quantization": entry.quantization,
        "state": "loaded" if loaded else "not-loaded",
        "max_context_length": entry.context_length,
        "loaded_context_length": entry.context_length if loaded else None,
    }


@router.get("/models")
def list_models(runtime: RuntimeDep) -> dict:
    loaded_key = runtime.loaded.entry.key if runtime.loaded else None
    return {"object": "list", "data": [lmstudio_card(e, loaded_key) for e in runtime.store.entries()]}


@router.get("/models/{model_id:path}")
def get_model(model_id: str, runtime: RuntimeDep) -> dict:
    loaded_key = runtime.loaded.entry.key if runtime.loaded else None
    return lmstudio_card(runtime.resolve(model_id), loaded_key)
