"""Content-derived identity of a model source: a full hash, plus a cheap stat check to skip it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

CHUNK = 1 << 20


# Files beside a single-file source that a converter may read with it (config, tokenizer,
# params.json, ONNX external data named after the model): they are part of its identity.
SIDECAR_NAMES = {
    "config.json", "params.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
}


# llama.cpp's split GGUFs: NAME-00001-of-00003.gguf, ...; every part belongs to the source.
SPLIT_GGUF = re.compile(r"^(?P<stem>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_parts(source: Path) -> list[Path]:
    """Every part of a split GGUF, in their numbered order, whether each exists or not; else [source]."""
    match = SPLIT_GGUF.match(source.name)
    if not match:
        return [source]
    count = int(match["count"])
    return [source.with_name(f"{match['stem']}-{number:05d}-of-{count:05d}.gguf") for number in range(1, count + 1)]


def files_of(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    return [source, *sidecars(source)]


def sidecars(source: Path) -> list[Path]:
    parts = set(split_parts(source))
    siblings = (p for p in source.parent.iterdir() if p.is_file() and p != source)
    return sorted(p for p in siblings if p.name in SIDECAR_NAMES or p.name.startswith(f"{source.name}.") or p in parts)


def content_hash(source: Path) -> str:
    """sha256 of the bytes (for a folder: of each file's relative name and bytes, in order)."""
    digest = hashlib.sha256()
    root = source if source.is_dir() else source.parent
    for path in files_of(source):
        if path != source:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of each file of a checkpoint folder, by relative name."""
    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def changed_files(folder: Path, recorded: dict[str, str]) -> list[str]:
    """How the folder differs from the digests recorded at commit: one line per missing, changed or extra file."""
    current = folder_digests(folder) if folder.is_dir() else {}
    problems = [f"{name}: missing" for name in recorded if name not in current]
    problems += [f"{name}: changed since it was converted (sha256 differs)" for name in recorded
                 if name in current and current[name] != recorded[name]]
    problems += [f"{name}: not part of the converted checkpoint" for name in current if name not in recorded]
    return problems


def stat_fingerprint(source: Path) -> list[int]:
    """Size and newest mtime: if these are unchanged for a known path, its hash is too."""
    stats = [os.stat(p) for p in files_of(source)]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0), len(stats)]


def entry_key(digest: str, fmt: str, fmt_version: str, options: dict) -> str:
    material = json.dumps([digest, fmt, fmt_version, options], sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


# File or package names that say nothing about the model: its folder's name is used instead.
GENERIC_STEMS = {"model", "pytorch_model", "consolidated", "weights", "checkpoint", "model-00001-of-00001"}


def slug(source: Path) -> str:
    """A readable model id from the source's name, e.g. `SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct-q4_1`."""
    name = SPLIT_GGUF.sub(r"\g<stem>.gguf", source.name)
    stem = name.removesuffix(".mlpackage") if source.is_dir() else name.rsplit(".", 1)[0]
    if stem.split(".")[0].lower() in GENERIC_STEMS:
        stem = source.parent.name
    return re.sub(r"[^a-z0-9_]+", "-", stem.lower()).strip("-") or "model"
