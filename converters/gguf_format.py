"""GGUF reader: llama.cpp's metadata, tensors and tokenizer, back into an HF-shaped model.

Q4_0, Q4_1 and Q8_0 tensors are kept as they are: `mx.load` returns them as MLX affine
weight/scales/biases with group size 32, so they are never requantised. Every other type is
dequantised with gguf-py (mx.load decodes Q4_K wrongly and turns BF16 into float16).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from tqdm import tqdm

from converters.errors import ConversionError
from converters.gguf_architectures import architecture_for, hf_module_path, qk_heads, unpermute_rows
from converters.source import SourceModel

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
MLX_NATIVE_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}
GROUP_SIZE = 32
FLOAT_DTYPES = {Q.F32: mx.float32, Q.F16: mx.float16, Q.BF16: mx.bfloat16}


def read(path: Path) -> SourceModel:
    reader = open_reader(path)
    meta = Metadata(reader)
    arch = architecture_for(meta.architecture)
    tensors = {t.name: t for t in reader.tensors}
    config = build_config(meta, arch, tensors)
    return SourceModel(
        architecture=meta.architecture,
        config=config,
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        tensors=lambda: iter_tensors(path, reader, config, arch.permuted_qk),
        save_tokenizer=lambda dest: save_tokenizer(path, dest),
        quantization=quantization_block(reader.tensors),
    )


def open_reader(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises assorted errors on damaged headers
        raise ConversionError(f"{path}: unreadable GGUF header ({exc}); the file is corrupt or truncated, download it again") from exc
    check_complete(path, reader)
    return reader


def check_complete(path: Path, reader: gguf.GGUFReader) -> None:
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size or tensor.data.size * tensor.data.itemsize < tensor.n_bytes:
            raise ConversionError(
                f"{path}: truncated, tensor '{tensor.name}' needs bytes up to {end} but the file has {size}; download it again"
            )


class Metadata:
    def __init__(self, reader: gguf.GGUFReader):
        self._fields = reader.fields
        self.architecture = self.get("general.architecture")
        if not self.architecture:
            raise ConversionError("GGUF metadata has no general.architecture")

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConversionError(f"GGUF metadata lacks '{key}', which is needed to rebuild the model config")
        return value

    def arch(self, key: str, default=None):
        return self.get(f"{self.architecture}.{key}", default)


def build_config(meta: Metadata, arch, tensors: dict) -> dict:
    prefix = meta.architecture
    heads = meta.require(f"{prefix}.attention.head_count")
    kv_heads = uniform(meta.arch("attention.head_count_kv", heads), "attention.head_count_kv")
    config = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": meta.require(f"{prefix}.embedding_length"),
        "intermediate_size": meta.require(f"{prefix}.feed_forward_length"),
        "num_hidden_layers": meta.require(f"{prefix}.block_count"),
        "num_attention_heads": uniform(heads, "attention.head_count"),
        "num_key_value_heads": kv_heads,
        "head_dim": out_features(tensors, "blk.0.attn_q.weight") // uniform(heads, "attention.head_count"),
        "rms_norm_eps": meta.arch("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.arch("rope.freq_base", 10000.0),
        "max_position_embeddings": meta.arch("context_length", 4096),
        "vocab_size": out_features(tensors, "token_embd.weight"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stop_token_ids(meta),
        **arch.extra_config,
    }
    if scaling := rope_scaling(meta):
        config["rope_scaling"] = scaling
    return config


def uniform(value, key: str) -> int:
    """Per-layer head counts are stored as arrays by some files; we support the uniform case."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ConversionError(f"per-layer '{key}' values {sorted(set(value))} are not supported yet")
        return int(value[0])
    return int(value)


def out_features(tensors: dict, name: str) -> int:
    if name not in tensors:
        raise ConversionError(f"GGUF file has no '{name}' tensor; it is not a complete language model")
    return int(tensors[name].shape[-1])


def stop_token_ids(meta: Metadata) -> list[int]:
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [meta.get(key) for key in keys]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def rope_scaling(meta: Metadata) -> dict | None:
    kind = meta.arch("rope.scaling.type")
    factor = meta.arch("rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    scaling = {"type": kind, "rope_type": kind, "factor": float(factor)}
    if original := meta.arch("rope.scaling.original_context_length"):
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def quantization_block(tensors) -> dict | None:
    """MLX's quantisation block for the tensors kept quantised, with per-layer overrides."""
    kept = {
        hf_module_path(t.name.rsplit(".", 1)[0]): MLX_NATIVE_BITS[t.tensor_type]
        for t in tensors
        if t.tensor_type in MLX_NATIVE_BITS
    }
    if not kept:
        return None
    default_bits = Counter(kept.values()).most_common(1)[0][0]
    block = {"group_size": GROUP_SIZE, "bits": default_bits, "mode": "affine"}
    for module, bits in kept.items():
        if bits != default_bits:
            block[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    return block


def iter_tensors(path: Path, reader: gguf.GGUFReader, config: dict, permuted_qk: bool):
    native = load_native(path, reader)
    for tensor in tqdm(reader.tensors, desc="tensors", unit="tensor", leave=False):
        module, kind = tensor.name.rsplit(".", 1)
        hf_module = hf_module_path(module)
        parts = native_parts(native, module) if tensor.name in native else {kind: dequantized(tensor)}
        heads = qk_heads(hf_module, config) if permuted_qk else None
        for suffix, array in parts.items():
            yield f"{hf_module}.{suffix}", unpermute_rows(array, heads) if heads else array


def load_native(path: Path, reader: gguf.GGUFReader) -> dict:
    if not any(t.tensor_type in MLX_NATIVE_BITS for t in reader.tensors):
        return {}
    try:
        arrays = mx.load(str(path))
    except Exception as exc:
        raise ConversionError(f"{path}: MLX could not read the quantised tensors ({exc})") from exc
    return {t.name: arrays for t in reader.tensors if t.tensor_type in MLX_NATIVE_BITS}


def native_parts(native: dict, module: str) -> dict:
    arrays = native[f"{module}.weight"]
    return {part: arrays[f"{module}.{part}"] for part in ("weight", "scales", "biases")}


def dequantized(tensor) -> mx.array:
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(shape)
    dtype = FLOAT_DTYPES.get(tensor.tensor_type)
    if dtype is None:
        # Dequantised blocks fit float16 unless a scale is extreme; keep float32 then.
        dtype = mx.float16 if np.isfinite(values.astype(np.float16)).all() else mx.float32
    return mx.array(values).astype(dtype)


def save_tokenizer(path: Path, dest: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many kinds on odd vocabularies
        raise ConversionError(f"{path}: could not rebuild the tokenizer from the GGUF metadata ({exc})") from exc
    tokenizer.save_pretrained(str(dest))
