"""Time to first token of a long, Cline-sized prompt: cold, then a request sharing its prefix, then the
same after a server restart (the prefix cache on disk). One run, one machine; prints a markdown table.

    .venv/bin/python bench/prefix_cache_bench.py [--model default] [--request ../shared/reference/cline-request.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

# Run as a script, only bench/ is on the path: the repository root goes first, for `bench.*` and the project.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import child_env, markdown_table, running_server  # noqa: E402

DEFAULT_REQUEST = ROOT.parent / "shared" / "reference" / "cline-request.json"


@contextlib.contextmanager
def server(home: Path, model: str, name: str):
    """Our server on `home`, its log in `home/server-NAME.log`; yields its URL once it is healthy."""
    command = [sys.executable, "-m", "api", "--model", model, "--log-level", "warning"]
    with running_server(command, child_env(home), home / f"server-{name}.log", "/health") as running:
        yield running.url


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
    with server(home, args.model, "first") as url:
        status = httpx.get(f"{url}/api/models/status").json()
        body["model"] = status["model"]
        rows.append(("cold", *first_token_seconds(url, body)))
        rows.append(("shared prefix", *first_token_seconds(url, turn(body, "Go on."))))
    with server(home, args.model, "restart") as url:
        rows.append(("shared prefix after restart", *first_token_seconds(url, turn(body, "Continue."))))
    print_table(rows, status)


def print_table(rows: list, status: dict) -> None:
    cold = rows[0][1]
    runtime = status.get("runtime", {})
    print(f"model {status['model']} ({status.get('layout')}), device {runtime.get('device')}, BLAS {runtime.get('blas')}\n")
    cells = [[name, str(usage["prompt_tokens"]), str(usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)),
              f"{seconds:.2f} s", f"{seconds / cold:.1%}"] for name, seconds, usage in rows]
    print(markdown_table(["request", "prompt tokens", "cached tokens", "time to first token", "vs cold"], cells))


if __name__ == "__main__":
    main()
