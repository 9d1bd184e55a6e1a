"""The converted-model store: one folder per entry, keyed by content, and a JSON index.

A checkpoint is written into a staging folder and renamed into place; the index is rewritten
through a temporary file and `os.replace`, under a file lock. So a crash at any point leaves
either no entry or a complete one, never a half-written one in the index.

A running server holds a lease on the entries it has loaded (a file per entry and process, ignored
once that process is gone): leased entries are never removed or evicted. With a size cap
(`IMPETUS_CACHE_MAX_BYTES`), the least recently used entries not in use are evicted after a conversion.
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

from errors import ImpetusError, ModelNotFoundError

STAGING_PREFIX = ".partial-"
CACHE_CAP_VARIABLE = "IMPETUS_CACHE_MAX_BYTES"


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
    # The conversion requests (overrides and memory budget) known to resolve to this entry.
    requests: list[dict] = field(default_factory=list)
    # sha256 of each checkpoint file at commit, for `convert.py --verify`.
    files: dict[str, str] = field(default_factory=dict)
    # The numeric checks at conversion (cache/numerics.py); empty for entries made before them.
    checks: dict = field(default_factory=dict)


class ModelStore:
    def __init__(self, home: Path, max_bytes: int | None = None):
        self.home = home
        self.models_dir = home / "models"
        self.index_path = home / "index.json"
        self.leases_dir = home / "leases"
        self.max_bytes = cache_cap_from_env() if max_bytes is None else max_bytes

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

    def find_source(self, source: Path, fingerprint: list[int], fmt: str, fmt_version: str, request: dict) -> Entry | None:
        """The entry this exact request made from this unchanged path before, found without hashing."""
        for entry in self.entries():
            same_build = (entry.format, entry.format_version) == (fmt, fmt_version) and request in entry.requests
            if same_build and entry.sources.get(str(source)) == fingerprint:
                return entry
        return None

    @contextlib.contextmanager
    def conversion_lock(self, digest: str):
        """Held while one source is converted: a second process converting it waits, then finds the entry."""
        locks = self.home / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{digest[:32]}.lock")):
            yield

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

    def remember(self, entry: Entry, source: Path, fingerprint: list[int], request: dict | None = None) -> Entry:
        """Record a use of an entry, the source path it was reached from, and the request that led to it."""
        with self._locked():
            entries = self.entries()
            for stored in entries:
                if stored.key == entry.key:
                    stored.sources[str(source)] = fingerprint
                    stored.last_used = time.time()
                    if request is not None and request not in stored.requests:
                        stored.requests.append(request)
                    entry = stored
            self._write(entries)
        return entry

    def touch(self, name: str) -> None:
        """Record a use of an entry (e.g. a server loading it), for least-recently-used eviction."""
        with self._locked():
            entries = self.entries()
            for stored in entries:
                if name in (stored.id, stored.key):
                    stored.last_used = time.time()
            self._write(entries)

    # ---- in use: leases held by running processes ----

    def mark_in_use(self, name: str, pid: int | None = None) -> Entry:
        """Lease an entry for a process (default: this one) until `release`; it is then never removed."""
        with self._locked():
            entry = self.require(name)
            self.leases_dir.mkdir(parents=True, exist_ok=True)
            self._lease_path(entry.key, pid or os.getpid()).touch()
        return entry

    def release(self, name: str, pid: int | None = None) -> None:
        entry = self.get(name)
        key = entry.key if entry else name
        self._lease_path(key, pid or os.getpid()).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lease(self, name: str):
        """`with store.lease(entry.id):` the entry stays in the cache while the block runs."""
        entry = self.mark_in_use(name)
        try:
            yield entry
        finally:
            self.release(entry.key)

    def users(self, key: str) -> list[int]:
        """Live processes holding a lease on the entry; leases of processes that are gone are removed."""
        live = []
        for path in self.leases_dir.glob(f"{key}.*"):
            pid = path.suffix.lstrip(".")
            if pid.isdigit() and _alive(int(pid)):
                live.append(int(pid))
            else:
                path.unlink(missing_ok=True)
        return sorted(live)

    def in_use(self, key: str) -> bool:
        return bool(self.users(key))

    # ---- removal and the size cap ----

    def remove(self, name: str) -> Entry:
        """Take an entry out of the index, then delete its folder; refused while a process leases it."""
        with self._locked():
            entry = self.require(name)
            if users := self.users(entry.key):
                raise ImpetusError(f"'{entry.id}' is in use by process {users[0]} (a running server); stop it or switch it to another model first")
            self._write([e for e in self.entries() if e.key != entry.key])
            # Renamed as staging of this process, so a kill mid-delete leaves what the next run cleans.
            doomed = self.models_dir / f"{STAGING_PREFIX}removing-{entry.key}-{os.getpid()}"
            os.replace(self.checkpoint_path(entry), doomed)
        shutil.rmtree(doomed)
        return entry

    def total_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.entries())

    def enforce_cap(self, keep: set[str] = frozenset()) -> list[Entry]:
        """Evict least recently used entries not in use (nor in `keep`) until the cache fits its cap."""
        if not self.max_bytes:
            return []
        evicted = []
        for entry in sorted(self.entries(), key=lambda e: e.last_used):
            if self.total_bytes() <= self.max_bytes:
                break
            if entry.key not in keep and not self.in_use(entry.key):
                evicted.append(self.remove(entry.key))
        return evicted

    def clean_staging(self) -> list[Path]:
        """Remove staging folders (and index temporaries) left by processes that are gone (e.g. killed mid-write)."""
        removed = []
        leftovers = [*self.models_dir.glob(f"{STAGING_PREFIX}*"), *self.home.glob("index.tmp-*")]
        for path in leftovers:
            pid = path.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and _alive(int(pid))):
                _delete(path)
                removed.append(path)
        return removed

    def require(self, name: str) -> Entry:
        entry = self.get(name)
        if entry is None:
            raise ModelNotFoundError(f"'{name}' is not a cached model id or key; `python convert.py --list` shows them")
        return entry

    def _lease_path(self, key: str, pid: int) -> Path:
        return self.leases_dir / f"{key}.{pid}"

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


def cache_cap_from_env() -> int | None:
    value = os.environ.get(CACHE_CAP_VARIABLE)
    if not value:
        return None
    if not value.isdigit():
        raise ImpetusError(f"{CACHE_CAP_VARIABLE}={value!r}: give the cache's size cap in bytes, e.g. 50000000000")
    return int(value)


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
