"""Which engine runs how: the in-process ones in a worker process, the servers as HTTP subprocesses;
and the environment each gets (the same IMPETUS_HOME for all, our server's preloads for the rows
that compare against it like for like)."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.harness import child_env
from bench.serving.http_servers import impetus_note, mlx_server_note, run_server
from bench.serving.results import Result
from bench.serving.workers import child_result, llama_cpp_result
from bench.serving.workload import Workload


def engine_env(home: Path, openblas_threads: int | None) -> dict:
    env = child_env(home)
    return {**env, "OPENBLAS_NUM_THREADS": str(openblas_threads)} if openblas_threads else env


def openblas_env(env: dict) -> dict:
    """The preloads our server gives itself (OpenBLAS, the single-row forwarding library in front, tcmalloc)."""
    from runtime.cpu.blas import server_preloads

    libraries = server_preloads(Path(env["IMPETUS_HOME"]) / "native")
    return {**env, "LD_PRELOAD": " ".join(libraries)} if libraries else env


def run_engine(engine: str, work: Workload, spec: Path, env: dict, entry_id: str, logs: Path) -> Result:
    """One engine's row. `spec` is the workload as JSON for worker processes; `entry_id` the converted
    model's id in IMPETUS_HOME, which our server is started with."""
    if engine in ("raw-q4", "raw-fp32"):
        return child_result(engine, spec, openblas_env(env) if engine == "raw-fp32" else env)
    if engine == "llama-cpp":
        return llama_cpp_result(spec, env)
    if engine == "impetus":
        command = [sys.executable, "-m", "api", "--model", entry_id, "--log-level", "warning"]
        return run_server(engine, command, env, entry_id, "/health", work, logs, impetus_note)
    command = [sys.executable, "-m", "mlx_lm.server", "--model", work.model_dir, "--log-level", "WARNING"]
    server_env = openblas_env(env) if engine == "mlx-server-openblas" else env
    return run_server(engine, command, server_env, "default_model", "/v1/models", work, logs, mlx_server_note)
