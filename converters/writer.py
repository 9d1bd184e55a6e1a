"""The one writer every converter shares: an MLX checkpoint folder that `mlx_lm.load` opens."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
from tqdm import tqdm

from cache.numerics import FiniteCheck
from converters.sniff import safetensors_header
from converters.source import SourceModel
from converters.validate import check_distinct, distinct, validate_checkpoint

if TYPE_CHECKING:
    from converters.planner import Plan

MAX_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class WrittenCheckpoint:
    path: Path
    size_bytes: int
    shards: int
    # The config's quantisation block as written (the source's, or the plan's).
    quantization: dict | None = None


def write_checkpoint(model: SourceModel, dest: Path, plan: "Plan | None" = None,
                     numbers: FiniteCheck | None = None) -> WrittenCheckpoint:
    """Write weights shard by shard, then config and tokenizer, into `dest` (a fresh folder), and check
    the result against the mlx-lm model before anyone can commit it to the cache. A `plan` that changes
    the weights (quantisation, dtype) is applied to the tensors as they stream through; `numbers`
    counts NaN and infinity in the source's tensors on their way, before the plan changes them."""
    dest.mkdir(parents=True)
    numbers = numbers or FiniteCheck(model.label)
    planned = planned_weights(model, plan)
    if model.adopt_files and planned is None:
        files = model.adopt_files()
        numbers.scan_files(files)
        weight_map = adopt_shards(files, dest, model.label)
    else:
        tensors = numbers.watch(distinct(model.tensors(), model.label))
        weight_map = write_shards(planned.apply(tensors) if planned else tensors, dest)
    quantization = planned.block() if planned else model.quantization
    write_json(dest / "config.json", checkpoint_config(model, quantization, replace=planned is not None))
    validate_checkpoint(dest, model.label)
    model.save_tokenizer(dest)
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    return WrittenCheckpoint(dest, size, len(set(weight_map.values())), quantization)


def planned_weights(model: SourceModel, plan: "Plan | None"):
    """The tensor transform for a plan that changes the weights; None when they are kept as they are."""
    if plan is None or not plan.options():
        return None
    from converters.quantize import PlannedWeights

    return PlannedWeights(model, plan)


def checkpoint_config(model: SourceModel, quantization: dict | None, replace: bool = False) -> dict:
    """The source's config with the quantisation block written; `replace` drops the source's own first."""
    dropped = ("quantization", "quantization_config") if replace else ()
    config = {k: v for k, v in model.config.items() if k not in dropped}
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def write_shards(tensors, dest: Path) -> dict[str, str]:
    """Save tensors in ≤ 5 GB shards as they arrive; returns the weight map (name -> file)."""
    shard_files: list[Path] = []
    names: list[list[str]] = []
    shard: dict[str, mx.array] = {}
    shard_size = 0
    for name, array in tensors:
        if shard and shard_size + array.nbytes > MAX_SHARD_BYTES:
            shard_files.append(flush_shard(shard, dest, len(shard_files)))
            names.append(list(shard))
            shard, shard_size = {}, 0
        shard[name] = array
        shard_size += array.nbytes
    if shard:
        shard_files.append(flush_shard(shard, dest, len(shard_files)))
        names.append(list(shard))
    return name_shards(shard_files, names, dest)


def adopt_shards(files: list[Path], dest: Path, label: str) -> dict[str, str]:
    """Copy safetensors files that `mlx_lm.load` reads as they are, unchanged; returns the weight map."""
    names = [tensor_names(file) for file in files]
    check_distinct((name for group in names for name in group), label)
    staged = [dest / f"partial-{number:05d}.safetensors" for number in range(len(files))]
    for file, target in zip(tqdm(files, desc="copying shards", unit="shard", leave=False), staged):
        # A copy, not a hard link: tools that re-save a checkpoint in place would otherwise change
        # the cached entry behind its content hash. The kernel copies, so this costs no memory.
        shutil.copyfile(file, target)
    return name_shards(staged, names, dest)


def tensor_names(file: Path) -> list[str]:
    return [name for name in safetensors_header(file) or {} if name != "__metadata__"]


def describe_quantization(block: dict | None) -> str:
    if not block:
        return "none"
    overrides = [v["bits"] for v in block.values() if isinstance(v, dict)]
    label = f"{block['bits']}-bit affine, group {block['group_size']}"
    if not overrides:
        return label
    layers = "layer" if len(overrides) == 1 else "layers"
    return f"{label} ({len(overrides)} {layers} at {'/'.join(map(str, sorted(set(overrides))))}-bit)"


def flush_shard(shard: dict, dest: Path, number: int) -> Path:
    path = dest / f"partial-{number:05d}.safetensors"
    mx.save_safetensors(str(path), shard, metadata={"format": "mlx"})
    return path


def name_shards(shard_files: list[Path], names: list[list[str]], dest: Path) -> dict[str, str]:
    count = len(shard_files)
    weight_map = {}
    for number, (path, tensor_names) in enumerate(zip(shard_files, names), start=1):
        final = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        path.rename(dest / final)
        weight_map.update(dict.fromkeys(tensor_names, final))
    total = sum((dest / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(dest / "model.safetensors.index.json", index)
    return weight_map


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
