"""The real Cline CLI (npm `cline@3.0.65`, offline) runs a task against the real server."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

CLINE = ROOT / "tests" / "cline" / "node_modules" / ".bin" / "cline"
TASK = "Create a file hello.txt containing hi"


def cline(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLINE), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def errors_in(events: list[dict]) -> list[dict]:
    return [e for e in events if "error" in (e.get("type", ""), e.get("event", {}).get("type", ""))]


@pytest.fixture(scope="module")
def cline_binary():
    if not CLINE.exists():
        if os.environ.get("CI"):
            pytest.fail("the Cline CLI is missing: `make test` installs it with npm from tests/cline")
        pytest.skip("the Cline CLI is not installed (needs npm): run `make test`")
    return CLINE


def test_cline_completes_a_task_without_api_errors(cline_binary, server, smollm2, tmp_path):
    data, workspace = tmp_path / "cline-data", tmp_path / "workspace"
    workspace.mkdir()
    auth = cline("auth", "-p", "openai", "-k", "any-key", "-m", smollm2.entry.id, "-b", f"{server}/v1", "--data-dir", data)
    assert auth.returncode == 0, auth.stderr

    run = cline("--data-dir", data, "--json", "-t", "600", "-c", workspace, TASK)

    events = json_events(run.stdout)
    results = [e for e in events if e.get("type") == "run_result"]
    assert run.returncode == 0, run.stderr[-2000:]
    assert results and results[-1]["finishReason"] == "completed"
    assert errors_in(events) == []
    assert results[-1]["usage"]["inputTokens"] > 4000  # Cline read our usage for its ~6k-token prompt
    log.info("Cline finished in %s iterations; workspace now holds %s; last text: %.200s",
             results[-1]["iterations"], sorted(p.name for p in workspace.iterdir()), results[-1].get("text", ""))
