"""The in-process engines (raw mlx-lm, llama.cpp) each run in a child process: `serve_bench.py
--worker ENGINE --spec WORKLOAD.json --result OUT.json`, so that the LD_PRELOAD it is given and the
peak RSS it reports are its own, not the parent's (which has loaded a tokenizer and converted the
model). The parent reads the child's `Result` back from JSON."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from bench.harness import ROOT
from bench.serving.results import Result, failed
from bench.serving.workload import Workload

log = logging.getLogger("serve_bench")

ENTRY = Path(__file__).resolve().parent.parent / "serve_bench.py"  # what a worker process runs
TIMEOUT = 1800  # seconds: a stuck worker is killed and its row says so


def run_worker(args) -> int:
    """In the child: run one engine on the workload, write its `Result`."""
    work = Workload.load(Path(args.spec))
    if args.worker == "llama-cpp":
        from bench.serving.llama_cpp_engine import llama_cpp_worker

        result = llama_cpp_worker(work)
    else:
        from bench.serving.raw_mlx import raw_mlx_worker

        result = raw_mlx_worker(work, "float32" if args.worker == "raw-fp32" else "as converted")
    Path(args.result).write_text(json.dumps(asdict(result)))
    return 0


def child_result(engine: str, spec: Path, env: dict, timeout: float = TIMEOUT) -> Result:
    """In the parent: one engine's worker process, and the `Result` it wrote (or why it wrote none)."""
    out = spec.with_name(f"{engine}.json")
    command = [sys.executable, str(ENTRY), "--worker", engine, "--spec", str(spec), "--result", str(out)]
    log.info("%s: starting worker (LD_PRELOAD=%s)", engine, env.get("LD_PRELOAD", ""))
    try:
        done = subprocess.run(command, check=False, cwd=ROOT, env=env, timeout=timeout)  # its log goes to our stderr
    except subprocess.TimeoutExpired:  # run() has killed it
        log.error("%s worker ran past %.0fs and was killed", engine, timeout)
        return failed(engine, f"timed out after {timeout:.0f}s")
    if done.returncode != 0:
        log.error("%s worker failed with exit status %d (its log is above)", engine, done.returncode)
        return failed(engine, f"failed (exit {done.returncode})")
    return Result(**json.loads(out.read_text()))


def llama_cpp_result(spec: Path, env: dict) -> Result:
    """llama.cpp's worker, or a "not installed" row where `import llama_cpp` fails in that environment."""
    found = subprocess.run([sys.executable, "-c", "import llama_cpp"], check=False, env=env, capture_output=True)
    if found.returncode != 0:
        log.info("llama-cpp: not installed (pip install -e '.[bench]' with AMX disabled, see bench/README.md)")
        return failed("llama-cpp", "not installed")
    return child_result("llama-cpp", spec, env)
