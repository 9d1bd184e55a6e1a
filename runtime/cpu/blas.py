"""Which BLAS serves MLX's float32 matrix products on Linux, and making it a fast one.

MLX's Linux CPU wheel bundles the reference BLAS. The server re-executes itself once with Debian's
OpenBLAS preloaded and, in front of it, a small library of ours (`native/gemv_forward.c`, built on
first use with the system C compiler) that answers the products against each weight matrix itself (over
helper threads of its own when OpenBLAS is set to several): a decode step's one row, or the few rows of
a small batch, with a prefetching kernel, since OpenBLAS releases before 0.3.27 pack the whole weight
matrix for them, and a prompt's rows in passes of wide vectors, faster than OpenBLAS 0.3.21's AVX2 kernels.
It also preloads tcmalloc where installed: every op of a decode step allocates (its array's
description, its output), and glibc's malloc, which merges free chunks after large frees, took 5-8% of
the step; with tcmalloc a SmolLM2 decode step went from 27 to 21 ms. Large buffers still go back to
the system when freed, so unloading a model frees its memory as before.
`report()` checks what really serves `cblas_sgemm` and `malloc` in this process, rather than trusting
the plan.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)
ALLOCATOR_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
)
RELAUNCHED = "IMPETUS_BLAS_RELAUNCHED"
GEMV_SOURCE = Path(__file__).parent / "native" / "gemv_forward.c"
GEMV_LIBRARY_PREFIX = "libimpetus_gemv"


def openblas_path() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def mapped_files(pid: int | str = "self") -> list[str] | None:
    """The files mapped into a process (this one by default), from /proc; None where there is no such file."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return None
    return [line.split(maxsplit=5)[5] for line in lines if line.count(" ") >= 5 and "/" in line]


def loaded_allocator() -> str:
    """Which malloc this process uses: a preloaded one, or the C library's."""
    files = mapped_files() or []
    names = ("tcmalloc", "jemalloc", "mimalloc")
    return next((name for name in names if any(f"/lib{name}" in file for file in files)), "glibc")


def loaded_blas() -> str:
    """The BLAS library mapped into this process."""
    files = mapped_files()
    if files is None:
        return "unknown"
    # Match library file names: numpy bundles its own `libscipy_openblas64_`, which MLX does not use.
    for name, library in (("openblas", "/libopenblas"), ("mkl", "/libmkl"), ("blis", "/libblis"), ("libblas", "/libblas")):
        if any(library in file for file in files):
            return name
    return "reference"


def gemv_forward_library(folder: Path) -> Path | None:
    """The forwarding library for this source and this processor, compiled once into `folder`."""
    from hardware import cpu_description

    built_for = f"{cpu_description().get('model')}|{os.uname().machine}".encode()
    digest = hashlib.sha256(GEMV_SOURCE.read_bytes() + built_for).hexdigest()[:12]
    target = folder / f"{GEMV_LIBRARY_PREFIX}-{digest}.so"
    return target if target.exists() or compile_library(GEMV_SOURCE, target) else None


def compile_library(source: Path, target: Path) -> bool:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler found: decode steps keep OpenBLAS's slower single-row sgemm")
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    # Built where it runs (the processor is in its name), so it may use all of this processor's vector units.
    command = [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-o", str(partial), str(source), "-ldl"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log.warning("could not build %s (decode steps stay slower): %s", source.name, done.stderr.strip())
        partial.unlink(missing_ok=True)
        return False
    partial.replace(target)  # atomic: a concurrent server sees the whole library or none
    return True


def allocator_path() -> str | None:
    return next((p for p in ALLOCATOR_CANDIDATES if Path(p).exists()), None)


def preloads(native_dir: Path) -> list[str]:
    """What to preload for a fast float32 BLAS: the forwarding library, then OpenBLAS; [] without OpenBLAS."""
    library = openblas_path()
    if library is None:
        return []
    forwarding = gemv_forward_library(native_dir)
    return [str(forwarding), library] if forwarding else [library]


def server_preloads(native_dir: Path) -> list[str]:
    """The BLAS preloads, then a faster allocator where one is installed."""
    return [*preloads(native_dir), *filter(None, [allocator_path()])]


def relaunch_with_openblas(native_dir: Path) -> None:
    """Re-exec this process with OpenBLAS (and the forwarding library) and tcmalloc preloaded, once, on Linux."""
    if not sys.platform.startswith("linux") or os.environ.get(RELAUNCHED) or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    libraries = server_preloads(native_dir)
    if openblas_path() is None:
        log.warning("OpenBLAS not found: MLX keeps its reference BLAS (slow on CPU); install libopenblas0-pthread")
    if not libraries:
        return
    preload = " ".join(filter(None, [*libraries, os.environ.get("LD_PRELOAD")]))
    env = {**os.environ, "LD_PRELOAD": preload, RELAUNCHED: "1"}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


class DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def symbol_provider(name: str) -> str | None:
    """The file of the first `name` in the global lookup order: for a preloaded library, the one MLX calls."""
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(getattr(process, name), ctypes.c_void_p)
    except (AttributeError, OSError):
        return None  # not global: MLX then calls its own bundled reference BLAS
    info = DlInfo()
    if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode()


@functools.lru_cache(maxsize=1)
def openblas_library():
    """The OpenBLAS already mapped into this process (never loads another), or None. Preloads do not
    change after start, so it is looked up once: batches set threads at every step."""
    path = next((f for f in mapped_files() or [] if "/libopenblas" in f), None)
    return ctypes.CDLL(path) if path else None


def threads() -> int | None:
    library = openblas_library()
    return library.openblas_get_num_threads() if library else None


def set_threads(count: int | None) -> None:
    library = openblas_library()
    if library is not None and count and threads() != count:
        library.openblas_set_num_threads(count)


def report() -> dict:
    """What serves MLX's float32 matrix products here, checked in this process."""
    provider = symbol_provider("cblas_sgemm")
    return {
        "blas": loaded_blas(),
        "sgemm_from": provider or "MLX's bundled reference BLAS",
        "single_row_gemv": bool(provider and Path(provider).name.startswith(GEMV_LIBRARY_PREFIX)),
        "threads": threads(),
        "allocator": loaded_allocator(),
    }
