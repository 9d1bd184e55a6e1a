"""Source -> cached MLX checkpoint: detect, look up the cache, else plan, convert, write and commit.

The cache-hit path uses only the standard library, so a repeated convert returns at once. A new source
is hashed, then converted under a lock on its content, so that two processes converting the same
source convert it once: the second waits and finds the entry the first committed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cache.fingerprint import content_hash, entry_key, files_of, folder_digests, slug, stat_fingerprint
from cache.numerics import FiniteCheck, checks_summary, probe_checkpoint
from cache.store import Entry, ModelStore
from converters import planner
from converters.planner import DEFAULT_MEMORY_SHARE, Budget, ModelShape, Overrides, Plan, SourcePrecision, choose
from converters.registry import Format, detect
from errors import ConversionError

log = logging.getLogger(__name__)

MEMORY_SHARE_VARIABLE = "IMPETUS_MEMORY_SHARE"
# Pretend the machine has this much memory (e.g. to size models for another machine).
MEMORY_BYTES_VARIABLE = "IMPETUS_MEMORY_BYTES"
# Files that sit beside weights without being weights, left out when measuring a source's precision.
NOT_WEIGHTS_SUFFIXES = (".json", ".txt", ".md", ".jinja", ".model", ".py")


@dataclass(frozen=True)
class Conversion:
    entry: Entry
    path: Path
    cached: bool
    seconds: float


def ensure_converted(source: Path, store: ModelStore, options: dict | None = None, allow_bad: bool = False) -> Conversion:
    """The cached checkpoint for `source`, converting it first if needed. `options` are the user's
    overrides (`bits`, `group_size`, `dtype`, `context`); without them the planner sizes the model.
    A conversion whose weights hold NaN or infinity, or whose probe gives unusable logits, is refused,
    unless `allow_bad`: then it is cached with a warning, and its entry's `checks` say what failed."""
    started = time.perf_counter()
    source = source.expanduser().absolute()
    request = conversion_request(options)
    fmt = detect(source)
    fingerprint = stat_fingerprint(source)
    entry = store.find_source(source, fingerprint, fmt.name, fmt.version, request)
    cached = entry is not None
    if not cached:
        entry, cached = convert_once(store, source, fmt, fingerprint, request, allow_bad)
    entry = store.remember(entry, source, fingerprint, request)
    if not cached:
        store.enforce_cap(keep={entry.key})
    return Conversion(entry, store.checkpoint_path(entry), cached, time.perf_counter() - started)


def already_converted(source: Path, store: ModelStore, options: dict | None = None) -> Entry | None:
    """The cached entry for a source seen before at this path, unchanged; no hashing, no heavy imports."""
    source = source.expanduser().absolute()
    fmt = detect(source)
    return store.find_source(source, stat_fingerprint(source), fmt.name, fmt.version, conversion_request(options))


def conversion_request(options: dict | None) -> dict:
    """What decides a conversion besides the source's bytes: the overrides and the memory budget."""
    overrides = overrides_from(options)
    return {**overrides.as_dict(), "budget_bytes": memory_budget().bytes}


def overrides_from(options: dict | None) -> Overrides:
    try:
        return Overrides(**(options or {}))
    except TypeError as exc:
        raise ConversionError(f"unknown conversion option ({exc}); use bits, group_size, dtype or context") from exc


def memory_budget() -> Budget:
    """A share (IMPETUS_MEMORY_SHARE, default 0.75) of the machine's memory (IMPETUS_MEMORY_BYTES overrides it)."""
    from hardware import machine_memory

    machine = env_number(MEMORY_BYTES_VARIABLE, int) or machine_memory()
    share = env_number(MEMORY_SHARE_VARIABLE, float) or DEFAULT_MEMORY_SHARE
    if not 0 < share <= 1:
        raise ConversionError(f"{MEMORY_SHARE_VARIABLE}={share}: give a share of memory between 0 and 1, e.g. 0.75")
    return Budget(machine, share)


def sizing_report() -> dict:
    """The machine-wide choices conversions follow here, for `GET /api/system/optimization`."""
    budget = memory_budget()
    return {
        "machine_bytes": budget.machine_bytes,
        "memory_share": budget.share,
        "budget_bytes": budget.bytes,
        "context_target": planner.DEFAULT_CONTEXT_TARGET,
        "minimum_context": planner.MINIMUM_CONTEXT,
        "widths": ["source", "16-bit", *(f"{bits}-bit" for bits in planner.LADDER_WIDTHS)],
        "mixed_widths": [f"{bits}/{planner.MIXED_HIGH_BITS}" for bits in planner.MIXED_WIDTHS],
        "group_size": planner.DEFAULT_GROUP_SIZE,
    }


def env_number(name: str, kind: type):
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return kind(value)
    except ValueError as exc:
        raise ConversionError(f"{name}={value!r}: not a number") from exc


def convert_once(store: ModelStore, source: Path, fmt: Format, fingerprint: list[int], request: dict,
                 allow_bad: bool = False) -> tuple[Entry, bool]:
    """(entry, cached): hash the source, then, holding its lock, find it (another process may have just
    converted it) or convert it."""
    digest = content_hash(source)
    with store.conversion_lock(digest):
        entry = store.find_source(source, fingerprint, fmt.name, fmt.version, request)
        if entry is not None:
            return entry, True
        model = fmt.read(source)
        plan = plan_for(model, source, request)
        key = entry_key(digest, fmt.name, fmt.version, plan.options())
        entry = store.get(key)
        if entry is not None:
            return entry, True
        return convert_into(store, source, fmt, model, plan, digest, key, allow_bad), False


def plan_conversion(source: Path, options: dict | None = None) -> Plan:
    """The plan a conversion of `source` would follow on this machine, without converting anything."""
    source = source.expanduser().absolute()
    model = detect(source).read(source)
    return plan_for(model, source, conversion_request(options))


def plan_for(model, source: Path, request: dict) -> Plan:
    overrides = overrides_from({k: v for k, v in request.items() if k != "budget_bytes"})
    shape = ModelShape.from_config(model.config, model.parameters)
    try:
        return choose(shape, source_precision(model, source), memory_budget(), overrides)
    except ConversionError as exc:
        raise ConversionError(f"{source}: {exc}") from exc


def source_precision(model, source: Path) -> SourcePrecision:
    """Quantised sources say their width; float sources are told apart by bytes per parameter."""
    block = model.quantization
    if block:
        return SourcePrecision(block["bits"], quantized=True, group_size=block.get("group_size"))
    weight_bytes = sum(p.stat().st_size for p in files_of(source) if not p.name.endswith(NOT_WEIGHTS_SUFFIXES))
    return SourcePrecision(32 if 8 * weight_bytes / max(model.parameters, 1) >= 24 else 16)


def convert_into(store: ModelStore, source: Path, fmt: Format, model, plan: Plan, digest: str, key: str,
                 allow_bad: bool = False) -> Entry:
    from converters.writer import describe_quantization, write_checkpoint

    store.clean_staging()
    log.info("converting %s (%s): %s", source, fmt.name, plan.layout.label(plan.source))
    with store.staging(key) as staged:
        numbers = FiniteCheck(model.label, allow_bad)
        written = write_checkpoint(model, staged, plan, numbers)
        probe = probe_checkpoint(staged, model.label, allow_bad)
        now = time.time()
        entry = Entry(
            key=key,
            id=slug(source) + plan.layout.id_suffix(),
            format=fmt.name,
            format_version=fmt.version,
            options=plan.options(),
            content_hash=digest,
            architecture=model.architecture,
            parameters=model.parameters,
            quantization=quantization_label(describe_quantization(written.quantization), plan),
            size_bytes=written.size_bytes,
            context_length=model.context_length,
            created=now,
            last_used=now,
            files=folder_digests(staged),
            checks=checks_summary(numbers.report(), probe),
        )
        return store.commit(staged, entry)


def quantization_label(described: str, plan: Plan) -> str:
    dtype = plan.layout.dtype
    return f"{described}, {dtype}" if dtype and described != "none" else (dtype or described)
