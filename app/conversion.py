"""A conversion as a child process (`convert.py --json --progress-json`), reported through callbacks.

The callbacks run on the run's reader thread; the UI hands them over to its own thread.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from app.server import ROOT

log = logging.getLogger(__name__)

CANCEL_TIMEOUT = 10.0


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int | None


@dataclass(frozen=True)
class Outcome:
    model: dict | None = None  # convert.py's JSON summary when it succeeded
    error: str | None = None
    cancelled: bool = False


def parse_progress(line: str) -> Progress | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
        return Progress(str(event["stage"]), int(event["done"]), event.get("total"))
    except (ValueError, KeyError, TypeError):
        return None  # a log line that happens to start with "{": kept as text by the caller


def outcome(code: int, stdout: str, lines: list[str], cancelled: bool) -> Outcome:
    if code == 0:
        return Outcome(model=json.loads(stdout))
    if cancelled:
        return Outcome(error="Cancelled.", cancelled=True)
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    return Outcome(error=(errors or lines or [f"convert.py exited with code {code}"])[-1])


class ConversionRun:
    def __init__(self, source: Path, home: Path, on_progress: Callable[[Progress], None],
                 on_done: Callable[[Outcome], None]):
        self.source = source
        self.home = home
        self.on_progress = on_progress
        self.on_done = on_done
        self.cancelled = False
        self.last_progress: Progress | None = None
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        command = [sys.executable, "-m", "convert", str(self.source), "--json", "--progress-json"]
        env = {**os.environ, "IMPETUS_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        log.info("converting %s (pid %d)", self.source, self._process.pid)
        threading.Thread(target=self._read, name=f"conversion-{self._process.pid}", daemon=True).start()

    def cancel(self) -> None:
        """SIGTERM, then SIGKILL: the store only ever commits complete checkpoints, so stopping is safe."""
        if self._process is None or self._process.poll() is not None:
            return
        self.cancelled = True
        self._process.terminate()
        try:
            self._process.wait(CANCEL_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()

    def _read(self) -> None:
        lines = []
        for raw in self._process.stderr:
            line = raw.strip()
            if (progress := parse_progress(line)) is not None:
                self.last_progress = progress
                self.on_progress(progress)
            elif line:
                log.info("convert: %s", line)
                lines.append(line)
        stdout = self._process.stdout.read()
        code = self._process.wait()
        self.on_done(outcome(code, stdout, lines, self.cancelled))
