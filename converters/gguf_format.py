"""GGUF reader: llama.cpp's metadata, tensors and tokenizer, back into an HF-shaped model for mlx-lm.

Opening the file (or a split GGUF's parts) is in `gguf_parts`, how each tensor type becomes MLX arrays in `gguf_quants`, how llama.cpp's names and layouts map
onto the mlx-lm modules in `gguf_architectures`, and the config in `gguf_config`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import gguf
import mlx.core as mx
from tqdm import tqdm

from converters.gguf_architectures import (
    CONFIG_TENSORS,
    Architecture,
    architecture_for,
    hf_module_path,
    is_norm,
    qk_heads,
    row_reordering,
    target_rope_layout,
)
from cache.fingerprint import split_parts
from converters.gguf_config import Metadata, build_config
from converters.gguf_parts import open_parts
from converters.gguf_quants import mlx_quantization, to_mlx
from converters.source import SourceModel
from converters.source import quantization_block as shared_quantization_block
from errors import ConversionError

log = logging.getLogger(__name__)


def read(path: Path) -> SourceModel:
    readers = open_parts(path)
    try:
        return source_model(path, readers)
    except ConversionError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def source_model(path: Path, readers: list[gguf.GGUFReader]) -> SourceModel:
    """The model of one GGUF, or of a split GGUF's parts in order: metadata from the first, tensors from all."""
    meta = Metadata(readers[0])
    tensors = [tensor for reader in readers for tensor in reader.tensors]
    arch = architecture_for(meta.architecture)
    config = build_config(meta, arch, {t.name: t for t in tensors})
    weights = [t for t in tensors if gguf_module(t) not in CONFIG_TENSORS]
    reorder = row_reordering(arch.rope_layout, target_rope_layout(config))
    types = Counter(t.tensor_type.name for t in weights)
    log.info("%s: %s, tensors by type %s", path.name, meta.architecture, dict(types))
    return SourceModel(
        architecture=meta.architecture,
        config=config,
        parameters=sum(int(t.n_elements) for t in weights),
        tensors=lambda: iter_tensors(weights, arch, config, reorder),
        save_tokenizer=lambda dest: save_tokenizer(split_parts(path)[0], dest),
        # Built before any tensor is read, so an unknown tensor name or type fails the conversion at once.
        quantization=quantization_block(weights, arch),
        source=path,
    )


def gguf_module(tensor) -> str:
    return tensor.name.rsplit(".", 1)[0]


def quantization_block(tensors, arch: Architecture) -> dict | None:
    """MLX's quantisation block for the layers that stay quantised: the most common setting, and
    an override for each layer quantised otherwise."""
    layers = {hf_module_path(gguf_module(t), arch): mlx_quantization(t) for t in tensors}
    return shared_quantization_block({module: q for module, q in layers.items() if q})


def iter_tensors(tensors, arch: Architecture, config: dict, reorder):
    for tensor in tqdm(tensors, desc="tensors", unit="tensor", leave=False):
        module, kind = tensor.name.rsplit(".", 1)
        hf_module = hf_module_path(module, arch)
        parts = to_mlx(tensor)
        if kind != "weight":  # a bias: never quantised
            parts = {kind: parts["weight"]}
        for suffix, array in parts.items():
            yield f"{hf_module}.{suffix}", as_target_expects(array, hf_module, arch, config, reorder)


def as_target_expects(array: mx.array, hf_module: str, arch: Architecture, config: dict, reorder) -> mx.array:
    """q/k rows in the target module's rope layout, Gemma norms without llama.cpp's + 1."""
    heads = qk_heads(hf_module, config) if reorder else None
    if heads:
        array = reorder(array, heads)
    if arch.norm_offset and is_norm(hf_module):
        array = (array.astype(mx.float32) - arch.norm_offset).astype(array.dtype)
    return array


def save_tokenizer(path: Path, dest: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many kinds on odd vocabularies
        raise ConversionError(f"{path}: could not rebuild the tokenizer from the GGUF metadata ({exc})") from exc
    tokenizer.save_pretrained(str(dest))
