"""Source -> cached MLX checkpoint: detect, look up the cache, else convert, write and commit.

The cache-hit path uses only the standard library, so a repeated convert returns at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cache.fingerprint import content_hash, entry_key, slug, stat_fingerprint
from cache.store import Entry, ModelStore
from converters.registry import Format, detect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversion:
    entry: Entry
    path: Path
    cached: bool
    seconds: float


def ensure_converted(source: Path, store: ModelStore, options: dict | None = None) -> Conversion:
    started = time.perf_counter()
    source = source.expanduser().absolute()
    options = options or {}
    fmt = detect(source)
    fingerprint = stat_fingerprint(source)
    entry, digest, key = lookup(store, source, fingerprint, fmt, options)
    cached = entry is not None
    if not cached:
        entry = convert_into(store, source, fmt, digest, key, options)
    entry = store.remember(entry, source, fingerprint)
    return Conversion(entry, store.checkpoint_path(entry), cached, time.perf_counter() - started)


def already_converted(source: Path, store: ModelStore, options: dict | None = None) -> Entry | None:
    """The cached entry for a source seen before at this path, unchanged; no hashing, no heavy imports."""
    source = source.expanduser().absolute()
    fmt = detect(source)
    return store.find_source(source, stat_fingerprint(source), fmt.name, fmt.version, options or {})


def lookup(store: ModelStore, source: Path, fingerprint: list[int], fmt: Format, options: dict):
    """(entry or None, content hash, key): by known path and stat first, else by full hash."""
    entry = store.find_source(source, fingerprint, fmt.name, fmt.version, options)
    if entry is not None:
        return entry, entry.content_hash, entry.key
    digest = content_hash(source)
    key = entry_key(digest, fmt.name, fmt.version, options)
    return store.get(key), digest, key


def convert_into(store: ModelStore, source: Path, fmt: Format, digest: str, key: str, options: dict) -> Entry:
    from converters.writer import describe_quantization, write_checkpoint

    store.clean_staging()
    log.info("converting %s (%s)", source, fmt.name)
    model = fmt.read(source)
    with store.staging(key) as staged:
        written = write_checkpoint(model, staged)
        now = time.time()
        entry = Entry(
            key=key,
            id=slug(source),
            format=fmt.name,
            format_version=fmt.version,
            options=options,
            content_hash=digest,
            architecture=model.architecture,
            parameters=model.parameters,
            quantization=describe_quantization(model.quantization),
            size_bytes=written.size_bytes,
            context_length=model.context_length,
            created=now,
            last_used=now,
        )
        return store.commit(staged, entry)
