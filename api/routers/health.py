from fastapi import APIRouter

from api.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health(runtime: RuntimeDep) -> dict:
    loaded = runtime.loaded
    return {"status": "ok", "model": loaded.entry.id if loaded else None}
