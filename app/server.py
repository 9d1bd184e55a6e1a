"""The server as a child process the app owns: started, watched and stopped by its PID, never by name."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from logging.handlers import RotatingFileHandler
from pathlib import Path
from collections.abc import Callable

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
LOG_BYTES = 2_000_000
LOG_BACKUPS = 3
STOP_TIMEOUT = 15.0
RECENT_LINES = 40


def server_command(host: str, port: int, model: str) -> list[str]:
    return [sys.executable, "-m", "api", "--host", host, "--port", str(port), "--model", model]


def rotating_log(path: Path) -> logging.Logger:
    """A logger of its own (not in logging's registry) that writes bare lines to a rotating file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    writer = logging.Logger(f"impetus.server-output.{path}")
    writer.addHandler(handler)
    return writer


def close_log(writer: logging.Logger) -> None:
    for handler in writer.handlers:
        handler.close()


def describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class ServerProcess:
    """One `python -m api` child, its output drained line by line into a rotating log file."""

    def __init__(self, command: list[str], home: Path, log_path: Path, on_exit: Callable[[int], None] | None = None):
        self.command = command
        self.home = home
        self.log_path = log_path
        self.on_exit = on_exit
        self.recent: deque[str] = deque(maxlen=RECENT_LINES)
        self.stopping = False
        self._process: subprocess.Popen | None = None
        self._drain: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def pid_path(self) -> Path:
        return self.home / "server.pid"

    @property
    def exit_code(self) -> int | None:
        return self._process.poll() if self._process else None

    def start(self) -> int:
        env = {**os.environ, "IMPETUS_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        # A session of its own: a Ctrl-C meant for the app's terminal does not reach the server directly.
        self._process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_path.write_text(str(self._process.pid))
        name = f"server-output-{self._process.pid}"
        self._drain = threading.Thread(target=self._drain_output, name=name, daemon=True)
        self._drain.start()
        log.info("started server pid %d: %s", self._process.pid, " ".join(self.command))
        return self._process.pid

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it is still there after `timeout` seconds; returns the exit code."""
        with self._lock:
            if self._process is None:
                return None
            self.stopping = True
            if self._process.poll() is None:
                self._terminate(timeout)
            self._drain.join(timeout=10)
            return self._process.returncode

    def last_error(self) -> str | None:
        """The last line of the server's output that reports an error, if any."""
        if self._drain is not None and self._drain is not threading.current_thread():
            self._drain.join(timeout=5)  # once the process has exited, its last lines are still being drained
        errors = [line.strip() for line in self.recent if "error" in line.lower()]
        return errors[-1] if errors else None

    def _terminate(self, timeout: float) -> None:
        log.info("stopping server pid %d", self._process.pid)
        self._process.terminate()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("server pid %d ignored SIGTERM for %.0f s: killing it", self._process.pid, timeout)
            self._process.kill()
            self._process.wait()

    def _drain_output(self) -> None:
        writer = rotating_log(self.log_path)
        writer.info("---- server pid %d: %s", self._process.pid, " ".join(self.command))
        try:
            for raw in iter(self._process.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                self.recent.append(line)
                writer.info(line)
            code = self._process.wait()
            writer.info("---- server pid %d ended (%s)", self._process.pid, describe_exit(code))
        finally:
            self._process.stdout.close()
            close_log(writer)
        self._forget_pid()
        if self.on_exit:
            self.on_exit(code)

    def _forget_pid(self) -> None:
        if self.pid_path.exists() and self.pid_path.read_text() == str(self._process.pid):
            self.pid_path.unlink()
