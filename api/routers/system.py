"""What Impetus found on this machine and chose from it."""

from fastapi import APIRouter

from api.deps import RuntimeDep

router = APIRouter(prefix="/api/system", tags=["system"])


@router.get("/optimization")
def optimization(runtime: RuntimeDep) -> dict:
    from dataclasses import asdict

    from converters.pipeline import sizing_report
    from runtime.blas import report
    from runtime.cpu_ops import installed
    from runtime.hardware import probe

    loaded = runtime.loaded
    return {
        "hardware": probe(),
        "conversion": sizing_report(),
        "runtime": {
            "layout": loaded.layout if loaded else None,
            # How the layout and BLAS threads were chosen, with each candidate's measured speeds.
            "tuning": asdict(loaded.tuning) if loaded else None,
            "blas": report(),
            "cpu_fast_ops": installed(),  # MLX's fast ops replaced on the CPU (runtime/cpu_ops.py)
            "batching": asdict(runtime.limits),
            "resident_budget_bytes": runtime.residency.budget_bytes,
            "prompt_cache_budget_bytes": runtime.prompt_cache.max_bytes,
        },
    }
