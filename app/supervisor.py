"""Starts, watches and stops the server, or attaches to one someone else started on the port.

Every method blocks (HTTP calls, process waits): the UI calls them off its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from collections.abc import Callable

from app.client import ServerClient, ServerUnreachable
from app.server import ServerProcess, describe_exit, server_command
from cache.store import ModelStore

log = logging.getLogger(__name__)

START_TIMEOUT = 900.0  # the first start of a big model converts it first


class Phase(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    ERROR = "error"


@dataclass(frozen=True)
class Snapshot:
    phase: Phase
    owned: bool = False
    pid: int | None = None
    status: dict | None = None
    message: str | None = None

    @property
    def model(self) -> str | None:
        return (self.status or {}).get("model")


class Supervisor:
    def __init__(self, home: Path, host: str, port: int, log_path: Path,
                 on_exit: Callable[[int], None] | None = None, start_timeout: float = START_TIMEOUT):
        self.home = home
        self.host = host
        self.port = port
        self.log_path = log_path
        self.on_exit = on_exit
        self.start_timeout = start_timeout
        self.client = ServerClient(self.base_url)
        self.process: ServerProcess | None = None
        self.snapshot = Snapshot(Phase.STOPPED)
        self._started_at = 0.0
        # start/stop/shutdown may race at quit (the UI thread shuts down while a start runs on a worker).
        self._lock = threading.RLock()
        self._closed = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, model: str) -> Snapshot:
        with self._lock:
            if self._closed:
                return self.snapshot
            if self._owns_live_process():
                return self.poll()
            return self.attach() or self._spawn(model)

    def attach(self) -> Snapshot | None:
        """Use a server that already answers on the port, without owning it."""
        try:
            status = self.client.status()
        except ServerUnreachable:
            return None
        log.info("attached to the server already running at %s", self.base_url)
        self.process = None
        note = f"Using the server already running at {self.base_url}; whoever started it stops it."
        return self._set(Snapshot(Phase.RUNNING, status=status, message=note))

    def stop(self) -> Snapshot:
        with self._lock:
            if self.process is None:
                return self.snapshot
            self.process.stop()
            self.process = None
            return self._set(Snapshot(Phase.STOPPED))

    def restart(self, model: str) -> Snapshot:
        with self._lock:
            self.stop()
            return self.start(model)

    def poll(self) -> Snapshot:
        if (process := self.process) is not None:
            return self._poll_owned(process)
        if self.snapshot.phase is Phase.RUNNING:
            return self._poll_attached()
        return self.attach() or self.snapshot

    def switch(self, model_id: str) -> Snapshot:
        status = self.client.switch(model_id)
        return self._set(replace(self.snapshot, phase=Phase.RUNNING, status=status, message=None))

    def models(self) -> list[dict]:
        """The server's list while it runs; the local cache's otherwise."""
        if self.snapshot.phase is Phase.RUNNING:
            try:
                return self.client.models()
            except ServerUnreachable as exc:
                # The next poll reports what happened to the server; the local list is still right.
                log.info("listing the local cache instead: %s", exc)
        return [{"id": entry.id, "loaded": False} for entry in ModelStore(self.home).entries()]

    def shutdown(self) -> None:
        """Stop the server if this app started it; one someone else started keeps running."""
        with self._lock:
            self._closed = True
            self.stop()

    def _spawn(self, model: str) -> Snapshot:
        command = server_command(self.host, self.port, model)
        self.process = ServerProcess(command, self.home, self.log_path, self._exited)
        pid = self.process.start()
        self._started_at = time.monotonic()
        return self._set(Snapshot(Phase.STARTING, owned=True, pid=pid))

    def _owns_live_process(self) -> bool:
        return self.process is not None and self.process.exit_code is None

    def _poll_owned(self, process: ServerProcess) -> Snapshot:
        code = process.exit_code
        if code is not None and self.snapshot.phase is Phase.ERROR:
            return self.snapshot
        if code is not None:
            return self._set(Snapshot(Phase.ERROR, owned=True, message=self._crash_message(process, code)))
        try:
            status = self.client.status()
        except ServerUnreachable:
            return self._still_starting(process)
        return self._set(Snapshot(Phase.RUNNING, owned=True, pid=process.pid, status=status))

    def _still_starting(self, process: ServerProcess) -> Snapshot:
        if self.snapshot.phase is Phase.STARTING and time.monotonic() - self._started_at > self.start_timeout:
            process.stop()
            return self._set(Snapshot(Phase.ERROR, owned=True,
                                      message=f"The server did not answer within {self.start_timeout:.0f} s."))
        return self.snapshot

    def _poll_attached(self) -> Snapshot:
        try:
            return self._set(Snapshot(Phase.RUNNING, status=self.client.status()))
        except ServerUnreachable:
            return self._set(Snapshot(Phase.STOPPED, message=f"The server at {self.base_url} went away."))

    def _crash_message(self, process: ServerProcess, code: int) -> str:
        last = process.last_error()
        started = self.snapshot.phase is Phase.STARTING
        what = "could not start" if started else "stopped unexpectedly"
        return f"The server {what} ({describe_exit(code)})." + (f" {last}" if last else "")

    def _exited(self, code: int) -> None:
        if self.on_exit:
            self.on_exit(code)

    def _set(self, snapshot: Snapshot) -> Snapshot:
        if snapshot.phase != self.snapshot.phase:
            log.info("server %s%s", snapshot.phase.value, f": {snapshot.message}" if snapshot.message else "")
        self.snapshot = snapshot
        return snapshot
