"""SafeTensors reader: HF folders (sharded by an index or not) and single `.safetensors` files with
config.json and tokenizer files beside them.

Tensors keep their HF names and their dtypes (bf16 stays bf16, fp32 stays fp32): what `mlx_lm.load`
reads from an HF folder. So when every tensor of every shard is wanted, the shards are adopted as they
are (copied by the kernel, then validated), which is the fastest conversion and needs no memory.
Otherwise the wanted tensors stream to the writer: `mx.load` maps a shard lazily, and each tensor is
handed over and forgotten, so the source is never held in memory twice.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from converters.hf import hf_source, read_config, sidecar_folder
from converters.sniff import safetensors_header
from converters.source import SourceModel
from converters.validate import check_distinct
from errors import ConversionError

INDEX = "model.safetensors.index.json"
# safetensors dtypes that mx.load reads as they are, and their sizes in bytes.
MLX_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
                   "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}

# Parts of a quantised layer other than its packed `.weight`.
QUANTISED_PARTS = (".scales", ".biases")

Plan = dict[Path, list[str]]  # shard file -> the tensor names to take from it, in file order


def read(path: Path) -> SourceModel:
    return source_from_shards(path, read_config(sidecar_folder(path), path))


def source_from_shards(path: Path, config: dict, quantization: dict | None = None) -> SourceModel:
    """The SourceModel for `path`'s safetensors shards, adopted whole when every tensor in them is wanted."""
    headers = {file: checked_header(file) for file in shard_files(path)}
    plan = tensor_plan(path, headers)
    whole_files = all(len(names) == len(header_names(headers[file])) for file, names in plan.items())
    shapes = {name: headers[file][name]["shape"] for file, names in plan.items() for name in names}
    return hf_source(path, config, lambda: iter_tensors(plan), count_parameters(shapes, quantization),
                     quantization=quantization, adopt_files=(lambda: list(plan)) if whole_files else None)


def count_parameters(shapes: dict[str, list[int]], quantization: dict | None) -> int:
    """Weights as the model sees them: a quantised matrix counts its unpacked size, not its packed words."""
    if not quantization:
        return sum(math.prod(shape) for shape in shapes.values())
    total = 0
    for name, shape in shapes.items():
        if name.endswith(QUANTISED_PARTS):
            continue
        module = name.rsplit(".", 1)[0]
        scales = shapes.get(f"{module}.scales")
        total += math.prod(shape[:-1]) * scales[-1] * group_size(quantization, module) if scales else math.prod(shape)
    return total


def group_size(quantization: dict, module: str) -> int:
    override = quantization.get(module)
    return (override if isinstance(override, dict) else quantization)["group_size"]


def index_of(path: Path) -> Path | None:
    index = path / INDEX
    return index if path.is_dir() and index.is_file() else None


def shard_files(path: Path) -> list[Path]:
    if index := index_of(path):
        return indexed_files(index)
    if path.is_file():
        refuse_lone_shard(path)
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path}: no .safetensors files in the folder")
    # HF repos may also hold other safetensors (e.g. Mistral's consolidated.safetensors); prefer model*.
    return [f for f in files if f.name.startswith("model")] or files


def indexed_files(index: Path) -> list[Path]:
    files = [index.parent / name for name in dict.fromkeys(read_weight_map(index).values())]
    for file in files:
        if not file.is_file():
            raise ConversionError(f"{index}: lists shard {file.name}, which is missing; download it again")
    return files


def tensor_plan(path: Path, headers: dict[Path, dict]) -> Plan:
    """Which tensors to take from which file: the index's weight map, else every tensor of every shard."""
    if index := index_of(path):
        return plan_from_index(index, headers)
    plan = {file: header_names(header) for file, header in headers.items()}
    check_distinct((name for names in plan.values() for name in names), str(path))
    return plan


def plan_from_index(index: Path, headers: dict[Path, dict]) -> Plan:
    plan: Plan = {}
    for name, file_name in read_weight_map(index).items():
        plan.setdefault(index.parent / file_name, []).append(name)
    for file, names in plan.items():
        absent = [name for name in names if name not in headers[file]]
        if absent:
            raise ConversionError(f"{file}: has no tensor '{absent[0]}', which {index.name} places there ({len(absent)} absent)")
    return plan


def read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{index}: not a safetensors index with a weight_map ({exc!r})") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: its weight_map is empty or not an object")
    return weight_map


def refuse_lone_shard(path: Path) -> None:
    index = path.parent / INDEX
    if not index.is_file():
        return
    shards = set(read_weight_map(index).values())
    if path.name in shards and len(shards) > 1:
        raise ConversionError(f"{path}: one shard of {len(shards)} listed in {index.name}; convert the folder {path.parent} instead")


def checked_header(file: Path) -> dict:
    """The file's safetensors header, once it is known to describe a complete file MLX can read."""
    header = safetensors_header(file)
    if header is None:
        raise ConversionError(f"{file}: bad safetensors header (not a safetensors file, or damaged); download it again")
    for name in header_names(header):
        check_entry(file, name, header[name])
    check_complete(file, header)
    return header


def header_names(header: dict) -> list[str]:
    return [name for name in header if name != "__metadata__"]


def check_complete(file: Path, header: dict) -> None:
    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
    data_end = max((header[name]["data_offsets"][1] for name in header_names(header)), default=0)
    needed, size = 8 + header_size + data_end, file.stat().st_size
    if size < needed:
        raise ConversionError(f"{file}: truncated, its tensors need {needed} bytes but the file has {size}; download it again")


def check_entry(file: Path, name: str, entry) -> None:
    """The header's promise for one tensor: a dtype MLX reads, and as many bytes as its shape needs."""
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        stored = end - start
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"{file}: bad safetensors header, tensor '{name}' has no valid dtype/shape/data_offsets") from exc
    if dtype not in MLX_DTYPE_SIZES:
        raise ConversionError(f"{file}: tensor '{name}' has dtype {dtype}, which MLX cannot load; save it as F32, F16 or BF16")
    if math.prod(shape) * MLX_DTYPE_SIZES[dtype] != stored:
        raise ConversionError(f"{file}: tensor '{name}' has shape {shape} ({dtype}) but {stored} bytes of data; the file is damaged")


def load_shard(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError) as exc:
        raise ConversionError(f"{file}: unreadable safetensors data ({exc})") from exc


def iter_tensors(plan: Plan):
    progress = tqdm(total=sum(map(len, plan.values())), desc="tensors", unit="tensor", leave=False)
    with progress:
        for file, names in plan.items():
            arrays = load_shard(file)
            for name in names:
                progress.update()
                # Popped, so that once the writer has saved a tensor nothing here keeps its data alive.
                yield name, arrays.pop(name)
