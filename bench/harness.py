"""What the benchmarks share: child processes and servers on free loopback ports, their environment,
peak RSS (of a live process from /proc, of a finished one from wait4), the BLAS a process has
mapped, markdown tables, the load average and a description of the machine.

Imports of MLX and of the project happen inside the functions that need them, so that importing the
harness is cheap and a script's `--help` loads nothing heavy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Child processes and servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def child_env(home: Path | None = None) -> dict[str, str]:
    """This process's environment for a child: the repository on PYTHONPATH, IMPETUS_HOME at `home` when
    given, and no preloads inherited, so that an engine's LD_PRELOAD is only the one it is given (and our
    server, not told it has already re-executed itself, picks its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IMPETUS_BLAS_RELAUNCHED")}
    env["PYTHONPATH"] = str(ROOT)
    if home is not None:
        env["IMPETUS_HOME"] = str(home)
    return env


def log_tail(path: Path, size: int = 2000) -> str:
    return path.read_text()[-size:] if path.exists() else ""


class Server:
    """A server subprocess on a free loopback port (`command` takes `--host` and `--port`), its output in
    a log file; always stopped by `stop()`."""

    def __init__(self, command: list[str], env: dict, log_path: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self.log_file = log_path.open("w")
        command = [*command, "--host", HOST, "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, path: str, timeout: float) -> None:
        """Until `path` answers 200; an error with the end of the log if the server exits or never does."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        self.log_file.flush()
        return log_tail(self.log_path)

    def stop(self) -> None:
        """SIGTERM, and a minute to exit (our server writes its prefix cache to disk first), then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("server %d ignored SIGTERM; killing it", self.process.pid)
                self.process.kill()
                self.process.wait(timeout=30)
        self.log_file.close()


@contextlib.contextmanager
def running_server(command: list[str], env: dict, log_path: Path, ready_path: str, timeout: float = 600):
    """A `Server` that answers on `ready_path`, stopped when the block ends, however it ends."""
    server = Server(command, env, log_path)
    try:
        server.wait_ready(ready_path, timeout)
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Finished:
    """A child process that has exited: its status, wall time, peak RSS and output."""

    returncode: int
    seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


def run_measured(command: list[str], env: dict) -> Finished:
    """Run `command` to its end in the repository root, timing it and taking its own peak RSS."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this child's own rusage; RUSAGE_CHILDREN would mix all runs together.
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = child.stdout.read().decode(), child.stderr.read().decode()
    return Finished(child.returncode, seconds, rusage_bytes(usage.ru_maxrss), stdout, stderr)


def rusage_bytes(ru_maxrss: int) -> int:
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024  # macOS counts bytes, Linux KiB


# ---------------------------------------------------------------------------------------------------
# A live process: peak RSS, BLAS


def peak_rss(pid: int | str = "self") -> int | None:
    """VmHWM: the peak resident set of a process that is still running (wait4 needs it to have exited)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def mapped_blas(pid: int | str = "self") -> str:
    """Which BLAS serves MLX's sgemm in that process. numpy's own `libscipy_openblas64_` does not count:
    its symbols are renamed, so only a system OpenBLAS (preloaded) interposes on MLX's bundled libblas."""
    from runtime.cpu.blas import mapped_files

    names = {Path(file).name for file in mapped_files(pid) or []}
    forwarding = " + decode-step kernels" if any(name.startswith("libimpetus_gemv") for name in names) else ""
    for prefix, label in (("libopenblas", "OpenBLAS"), ("libmkl", "MKL"), ("libblis", "BLIS")):
        if any(name.startswith(prefix) for name in names):
            return label + forwarding
    if any(name.startswith("libblas") for name in names):
        return "reference libblas"
    return "none mapped"


# ---------------------------------------------------------------------------------------------------
# Reports


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> str:
    """A markdown table; the columns numbered in `right` are aligned right."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "".join("---:|" if column in right else "---|" for column in range(len(header)))
    return "\n".join([line(header), rule, *map(line, rows)])


def load_average() -> float:
    """The 1-minute load average: other work on the machine shows in every figure, so reports give it."""
    return os.getloadavg()[0]


def machine() -> dict:
    from importlib.metadata import version

    import mlx.core as mx

    from hardware import cpu_description, physical_memory
    from runtime.cpu.blas import openblas_path

    cpu = cpu_description()
    return {
        "cpu": cpu.get("model"), "cores": cpu.get("cores"), "usable_cores": cpu.get("usable_cores"),
        "ram_gib": round(physical_memory() / 2**30, 1), "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "mlx": mx.__version__, "mlx_lm": version("mlx-lm"),
        "device": str(mx.default_device()), "openblas": openblas_path() or "not found",
    }


def machine_line(info: dict) -> str:
    return (f"{info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['ram_gib']} GiB RAM, "
            f"{info['os']}, Python {info['python']}, MLX {info['mlx']} ({info['device']}), mlx-lm {info['mlx_lm']}, "
            f"OpenBLAS: {info['openblas']}")
