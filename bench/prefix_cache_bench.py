"""Time to first token of a long, Cline-sized prompt: cold, then a request sharing its prefix, then the
same after a server restart (the prefix cache on disk). One run, one machine; prints a markdown table.

    .venv/bin/python bench/prefix_cache_bench.py [--model default] [--request ../shared/reference/cline-request.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REQUEST = ROOT.parent / "shared" / "reference" / "cline-request.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(home: Path, model: str):
    port = free_port()
    env = {**os.environ, "IMPETUS_HOME": str(home)}
    command = [sys.executable, "-m", "api", "--port", str(port), "--model", model, "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def wait_healthy(url: str, process: subprocess.Popen) -> None:
    for _ in range(1200):
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit("server did not start")


def first_token_seconds(url: str, body: dict) -> tuple[float, dict]:
    """Wall time of a one-token reply: prefill plus one decode step."""
    started = time.perf_counter()
    reply = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 1}, timeout=3600)
    reply.raise_for_status()
    return time.perf_counter() - started, reply.json()["usage"]


def turn(body: dict, text: str) -> dict:
    extra = [{"role": "assistant", "content": "Working on it."}, {"role": "user", "content": text}]
    return {**body, "messages": body["messages"] + extra}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--request", type=Path, default=DEFAULT_REQUEST)
    args = parser.parse_args()
    body = {k: v for k, v in json.loads(args.request.read_text()).items() if k not in ("stream", "stream_options")}
    home = Path(tempfile.mkdtemp(prefix="impetus-bench-"))
    rows = []
    with server(home, args.model) as url:
        status = httpx.get(f"{url}/api/models/status").json()
        body["model"] = status["model"]
        rows.append(("cold", *first_token_seconds(url, body)))
        rows.append(("shared prefix", *first_token_seconds(url, turn(body, "Go on."))))
    with server(home, args.model) as url:
        rows.append(("shared prefix after restart", *first_token_seconds(url, turn(body, "Continue."))))
    print_table(rows, status)


def print_table(rows: list, status: dict) -> None:
    cold = rows[0][1]
    runtime = status.get("runtime", {})
    print(f"model {status['model']} ({status.get('layout')}), device {runtime.get('device')}, BLAS {runtime.get('blas')}\n")
    print("| request | prompt tokens | cached tokens | time to first token | vs cold |")
    print("|---|---|---|---|---|")
    for name, seconds, usage in rows:
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        print(f"| {name} | {usage['prompt_tokens']} | {cached} | {seconds:.2f} s | {seconds / cold:.1%} |")


if __name__ == "__main__":
    main()
