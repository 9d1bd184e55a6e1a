"""The converted-model store: one folder per entry, keyed by content, and a JSON index.

A checkpoint is written into a staging folder and renamed into place; the index is rewritten
through a temporary file and `os.replace`, under a file lock. So a crash at any point leaves
either no entry or a complete one, never a half-written one in the index.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

STAGING_PREFIX = ".partial-"


@dataclass
class Entry:
    key: str
    id: str
    format: str
    format_version: str
    options: dict
    content_hash: str
    architecture: str
    parameters: int
    quantization: str
    size_bytes: int
    context_length: int | None
    created: float
    last_used: float
    # Known source paths and their stat fingerprints, to skip re-hashing unchanged files.
    sources: dict[str, list[int]] = field(default_factory=dict)


class ModelStore:
    def __init__(self, home: Path):
        self.home = home
        self.models_dir = home / "models"
        self.index_path = home / "index.json"

    def checkpoint_path(self, entry: Entry) -> Path:
        return self.models_dir / entry.key

    def entries(self) -> list[Entry]:
        if not self.index_path.exists():
            return []
        raw = json.loads(self.index_path.read_text())
        entries = [Entry(**item) for item in raw.get("entries", [])]
        return [e for e in entries if (self.checkpoint_path(e) / "config.json").exists()]

    def get(self, name: str) -> Entry | None:
        return next((e for e in self.entries() if name in (e.id, e.key)), None)

    def find_source(self, source: Path, fingerprint: list[int], fmt: str, fmt_version: str, options: dict) -> Entry | None:
        for entry in self.entries():
            same_build = (entry.format, entry.format_version, entry.options) == (fmt, fmt_version, options)
            if same_build and entry.sources.get(str(source)) == fingerprint:
                return entry
        return None

    @contextlib.contextmanager
    def staging(self, key: str):
        """A fresh folder path to write a checkpoint into; removed if the block fails."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        path = self.models_dir / f"{STAGING_PREFIX}{key}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        try:
            yield path
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    def commit(self, staged: Path, entry: Entry) -> Entry:
        with self._locked():
            final = self.checkpoint_path(entry)
            if final.exists():
                shutil.rmtree(staged)  # another process committed the same content first
            else:
                os.replace(staged, final)
            entries = [e for e in self.entries() if e.key != entry.key]
            entry.id = self._unique_id(entry.id, entry.key, entries)
            self._write([*entries, entry])
        return entry

    def remember(self, entry: Entry, source: Path, fingerprint: list[int]) -> Entry:
        """Record a use of an entry, and the source path it was reached from."""
        with self._locked():
            entries = self.entries()
            for stored in entries:
                if stored.key == entry.key:
                    stored.sources[str(source)] = fingerprint
                    stored.last_used = time.time()
                    entry = stored
            self._write(entries)
        return entry

    def clean_staging(self) -> list[Path]:
        """Remove staging folders left by processes that are gone (e.g. killed mid-write)."""
        removed = []
        for path in self.models_dir.glob(f"{STAGING_PREFIX}*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def _unique_id(self, wanted: str, key: str, others: list[Entry]) -> str:
        taken = {e.id for e in others}
        return wanted if wanted not in taken else f"{wanted}-{key[:6]}"

    def _locked(self) -> FileLock:
        self.home.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.home / ".index.lock"))

    def _write(self, entries: list[Entry]) -> None:
        tmp = self.index_path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"version": 1, "entries": [asdict(e) for e in entries]}, indent=2))
        os.replace(tmp, self.index_path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
