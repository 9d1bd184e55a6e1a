"""Cheap, stdlib-only content checks used to detect formats without importing converters."""

from __future__ import annotations

from pathlib import Path

GGUF_MAGIC = b"GGUF"


def read_head(path: Path, size: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def is_gguf(path: Path) -> bool:
    return path.is_file() and read_head(path, 4) == GGUF_MAGIC


def describe(path: Path) -> str:
    """A short description of what the input looks like, for 'unknown format' errors."""
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())[:8]
        return f"a folder containing {', '.join(names) or 'nothing'}"
    head = read_head(path)
    if not head:
        return "an empty file"
    if _looks_like_text(head):
        return f"a text file starting with {head.decode('utf-8', 'replace')!r}"
    return f"a binary file starting with bytes {head[:8].hex(' ')}"


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch >= 0x20 or ch in b"\t\r\n" for ch in head)
