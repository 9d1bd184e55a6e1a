from fastapi import APIRouter

from api.deps import RuntimeDep
from cache.store import Entry

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_card(entry: Entry) -> dict:
    return {
        "id": entry.id,
        "object": "model",
        "created": int(entry.created),
        "owned_by": "impetus",
        "context_length": entry.context_length,
    }


@router.get("")
def list_models(runtime: RuntimeDep) -> dict:
    return {"object": "list", "data": [model_card(entry) for entry in runtime.store.entries()]}


@router.get("/{model_id:path}")
def get_model(model_id: str, runtime: RuntimeDep) -> dict:
    return model_card(runtime.resolve(model_id))
