"""What Impetus found on this machine and chose from it."""

import sys

from fastapi import APIRouter

from api.deps import RuntimeDep

router = APIRouter(prefix="/api/system", tags=["system"])


@router.get("/optimization")
def optimization(runtime: RuntimeDep) -> dict:
    from dataclasses import asdict

    from converters.pipeline import sizing_report
    from hardware import probe
    from runtime.cpu.blas import loaded_blas, report
    from runtime.cpu.ops import installed

    loaded = runtime.loaded
    return {
        # The BLAS is this process's, not the machine's, so the probe leaves it to the runtime.
        "hardware": {**probe(), "blas": loaded_blas()} if sys.platform.startswith("linux") else probe(),
        "conversion": sizing_report(),
        "runtime": {
            "layout": loaded.layout if loaded else None,
            # How the layout and BLAS threads were chosen, with each candidate's measured speeds.
            "tuning": asdict(loaded.tuning) if loaded else None,
            "blas": report(),
            "cpu_fast_ops": installed(),  # MLX's fast ops replaced on the CPU (runtime/cpu/ops.py)
            "batching": asdict(runtime.limits),
            "resident_budget_bytes": runtime.residency.budget_bytes,
            "prompt_cache_budget_bytes": runtime.prompt_cache.max_bytes,
        },
    }
