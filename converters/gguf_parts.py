"""Opening a GGUF: one file, or every part of a split one, each checked whole before a tensor is read.

llama.cpp's `gguf-split` writes NAME-00001-of-0000N.gguf, ...: the first part holds the metadata, and
every part says which one it is (`split.no`, `split.count`) and how many tensors all hold together
(`split.tensors.count`). Parts are joined only in the order their names give, and only when their
metadata agree, so a part that was renamed, left out or taken from another download is refused,
never joined out of order.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from cache.fingerprint import split_parts
from errors import ConversionError

SPLIT_NUMBER, SPLIT_COUNT, SPLIT_TENSORS = (
    gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)


def open_parts(path: Path) -> list[gguf.GGUFReader]:
    """A reader for each part of the GGUF at `path` (one for an unsplit file), in their order."""
    parts = split_parts(path)
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise ConversionError(f"{path}: split GGUF part {missing[0]} is missing ({len(missing)} of {len(parts)} parts "
                              "missing): download every part into the same folder")
    readers = [open_reader(part) for part in parts]
    check_split(parts, readers)
    return readers


def open_reader(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises assorted errors on damaged headers
        raise ConversionError(f"{path}: unreadable GGUF header ({exc}); the file is corrupt or truncated, download it again") from exc
    check_complete(path, reader)
    return reader


def check_complete(path: Path, reader: gguf.GGUFReader) -> None:
    """Every tensor's bytes lie inside the file, and no two tensors share bytes."""
    size = path.stat().st_size
    end_of_previous, previous = 0, None
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        end = tensor.data_offset + tensor.n_bytes
        if end > size or tensor.data.size * tensor.data.itemsize < tensor.n_bytes:
            raise ConversionError(
                f"{path}: truncated, tensor '{tensor.name}' needs bytes up to {end} but the file has {size}; download it again"
            )
        if tensor.data_offset < end_of_previous:
            raise ConversionError(f"{path}: tensors '{previous}' and '{tensor.name}' overlap; the file is corrupt, download it again")
        end_of_previous, previous = end, tensor.name


def field(reader: gguf.GGUFReader, key: str):
    value = reader.fields.get(key)
    return None if value is None else value.contents()


def check_split(parts: list[Path], readers: list[gguf.GGUFReader]) -> None:
    count = len(parts)
    for number, (part, reader) in enumerate(zip(parts, readers)):
        says = (field(reader, SPLIT_NUMBER) or 0, field(reader, SPLIT_COUNT) or 1)
        if says != (number, count):
            raise ConversionError(
                f"{part}: its metadata says it is part {says[0] + 1} of {says[1]}, its name part {number + 1} of {count}; "
                "the parts were renamed or mixed from different downloads: keep llama.cpp's NAME-0000k-of-0000N.gguf "
                "names of one download")
    expected = field(readers[0], SPLIT_TENSORS)
    found = sum(len(reader.tensors) for reader in readers)
    if count > 1 and expected != found:
        raise ConversionError(f"{parts[0]}: the split GGUF should hold {expected} tensors, its {count} parts hold {found}; "
                              "a part is damaged or from another download")
