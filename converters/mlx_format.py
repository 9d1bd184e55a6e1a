"""MLX reader: checkpoints that already are MLX (a folder as `mlx_lm.convert` writes it, or an `.npz`
with config.json and tokenizer files beside it).

A folder's safetensors files are adopted as they are: checked, copied into the cache and validated
against the mlx-lm model, never decoded and rewritten. An `.npz` is rewritten as safetensors, the only
weight format `mlx_lm.load` reads.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import mlx.core as mx

from converters.hf import hf_source, read_config, sidecar_folder
from converters.safetensors_format import count_parameters, source_from_shards
from converters.source import SourceModel
from errors import ConversionError


def read(path: Path) -> SourceModel:
    return read_npz(path) if path.is_file() else read_folder(path)


def read_folder(path: Path) -> SourceModel:
    # Any model type mlx-lm has a module for: the writer's validation asks mlx-lm itself.
    config = read_config(path, path, model_types=None)
    return source_from_shards(path, config, quantization=config.get("quantization"))


def read_npz(path: Path) -> SourceModel:
    config = read_config(sidecar_folder(path), path, model_types=None)
    arrays = load_npz(path)
    shapes = {name: array.shape for name, array in arrays.items()}
    quantization = config.get("quantization")
    return hf_source(path, config, lambda: iter(arrays.items()), count_parameters(shapes, quantization),
                     quantization=quantization)


def load_npz(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, zipfile.BadZipFile) as exc:
        raise ConversionError(f"{path}: unreadable .npz ({exc})") from exc
