"""What this machine's MLX build runs on, and the choices that follow from it.

MLX's Linux CPU wheel links the reference BLAS; preloading an optimised one (Debian's OpenBLAS)
makes fp32 matrix products tens of times faster. Quantised CPU kernels stay naive, so on such a
machine a model that fits is run dequantised to float32.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)
RELAUNCHED = "IMPETUS_BLAS_RELAUNCHED"
# A dequantised model may take at most this share of the memory available now.
FP32_MEMORY_SHARE = 0.5


def openblas_path() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def loaded_blas() -> str:
    """The BLAS library mapped into this process, as seen in /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("openblas", "mkl", "blis", "libblas"):
        if name in maps:
            return name
    return "reference"


def relaunch_with_openblas() -> None:
    """Re-exec this process with OpenBLAS preloaded, once, on Linux, when it is installed."""
    if not sys.platform.startswith("linux") or os.environ.get(RELAUNCHED) or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    library = openblas_path()
    if library is None:
        log.warning("OpenBLAS not found: MLX keeps its reference BLAS (slow on CPU); install libopenblas0-pthread")
        return
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    env = {**os.environ, "LD_PRELOAD": preload, RELAUNCHED: "1"}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def available_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def prefers_fp32_weights(parameters: int) -> bool:
    """On the CPU with an optimised BLAS, fp32 matmuls beat MLX's naive quantised kernels."""
    import mlx.core as mx

    on_cpu = mx.default_device() == mx.cpu
    fits = parameters * 4 < FP32_MEMORY_SHARE * available_memory()
    return on_cpu and loaded_blas() == "openblas" and fits


def runtime_report() -> dict:
    import mlx.core as mx

    return {"device": str(mx.default_device()), "blas": loaded_blas(), "available_memory_bytes": available_memory()}
