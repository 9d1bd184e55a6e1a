"""Cheap, stdlib-only content checks used to detect formats without importing converters.

Each check looks at bytes or folder contents, never at file extensions alone.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"
# Fields of ONNX's ModelProto that may follow ir_version: producer_name .. opset_import, functions.
ONNX_FOLLOWING_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x7A}


def read_head(path: Path, size: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def is_gguf(path: Path) -> bool:
    return path.is_file() and read_head(path, 4) == GGUF_MAGIC


def safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file, or None if the file is not one."""
    head = read_head(path, 9)
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length > min(path.stat().st_size - 8, 100 << 20):
        return None
    with open(path, "rb") as handle:
        handle.seek(8)
        try:
            return json.loads(handle.read(length))
        except ValueError:
            return None


def is_safetensors_file(path: Path) -> bool:
    return path.is_file() and safetensors_header(path) is not None


def zip_members(path: Path) -> list[str]:
    if read_head(path, 4) != ZIP_MAGIC:
        return []
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return ["<damaged zip>"]


def is_pickle(path: Path) -> bool:
    head = read_head(path, 2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def is_pytorch_file(path: Path) -> bool:
    if not path.is_file():
        return False
    members = zip_members(path)
    return any(m.endswith("data.pkl") for m in members) or (not members and is_pickle(path)) or (members == ["<damaged zip>"] and b"/data.pkl" in read_head(path, 512))


def is_npz(path: Path) -> bool:
    members = zip_members(path) if path.is_file() else []
    return bool(members) and all(m.endswith(".npy") for m in members)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def _protobuf_start(path: Path) -> tuple[int, int, bytes] | None:
    """(field-1 varint, next tag, next field's first bytes) if the file starts like a protobuf message."""
    head = read_head(path, 64)
    if len(head) < 4 or head[0] != 0x08:
        return None
    first, pos = _varint(head, 1)
    if pos >= len(head):
        return None
    tag = head[pos]
    length, start = _varint(head, pos + 1)
    return first, tag, head[start : start + max(length, 0)]


def _printable(data: bytes) -> bool:
    return all(0x20 <= ch < 0x7F for ch in data)


def is_onnx_file(path: Path) -> bool:
    """ONNX ModelProto: ir_version, then producer_name (text) or another top-level field."""
    start = _protobuf_start(path) if path.is_file() else None
    if start is None:
        return False
    ir_version, tag, payload = start
    return 1 <= ir_version <= 30 and tag in ONNX_FOLLOWING_TAGS and (tag != 0x12 or _printable(payload))


def is_mlmodel_file(path: Path) -> bool:
    """Core ML Model: specificationVersion, then a ModelDescription message (not text)."""
    start = _protobuf_start(path) if path.is_file() else None
    if start is None:
        return False
    version, tag, payload = start
    return 1 <= version <= 30 and tag == 0x12 and payload[:1] == b"\x0a" and not _printable(payload)


def top_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def is_mlpackage(path: Path) -> bool:
    return path.is_dir() and (path / "Manifest.json").is_file() and (path / "Data").is_dir()


def _config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _weight_shards(folder: Path) -> list[Path]:
    return [p for p in top_files(folder) if p.suffix == ".safetensors"]


def is_mlx_folder(path: Path) -> bool:
    """config.json + safetensors written by MLX: a quantization block, or MLX's format tag."""
    shards = _weight_shards(path)
    config = _config(path) if shards else None
    if config is None:
        return False
    if "quantization" in config:
        return True
    header = safetensors_header(shards[0]) or {}
    return header.get("__metadata__", {}).get("format") == "mlx"


def is_hf_safetensors(path: Path) -> bool:
    if path.is_file():
        return is_safetensors_file(path)
    return bool(_weight_shards(path)) and not is_mlx_folder(path)


def is_pytorch(path: Path) -> bool:
    if path.is_file():
        return is_pytorch_file(path)
    files = top_files(path)
    has_torch = any(p.name.startswith(("pytorch_model", "consolidated.")) or p.suffix in (".pt", ".pth", ".bin") for p in files)
    return has_torch and not _weight_shards(path) and not any(p.suffix == ".onnx" for p in files)


def is_onnx(path: Path) -> bool:
    if path.is_file():
        return is_onnx_file(path)
    return any(p.suffix == ".onnx" and is_onnx_file(p) for p in top_files(path)) and not _weight_shards(path)


def is_coreml(path: Path) -> bool:
    return is_mlpackage(path) or (path.is_file() and is_mlmodel_file(path))


def is_mlx(path: Path) -> bool:
    return is_mlx_folder(path) or (path.is_file() and is_npz(path))


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
