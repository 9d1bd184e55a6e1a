"""An HF-style config.json rebuilt from GGUF metadata, spelled the way the mlx-lm modules read it.

Where llama.cpp's converter writes no key for a hyperparameter, llama.cpp's own loader hard-codes
it; we read the standard gguf-py key when a file has one and otherwise apply the same rule.
"""

from __future__ import annotations

import gguf
import numpy as np

from converters.gguf_architectures import Architecture
from errors import ConversionError

# llama.cpp sizes Gemma's attention scale by model: only its 27B variants (told apart by layer count)
# use hidden_size / heads instead of head_dim.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's fixed Gemma 3 local-attention settings, for files without the keys.
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_SLIDING_PATTERN = 6


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

    def require_arch(self, key: str):
        return self.require(f"{self.architecture}.{key}")


def build_config(meta: Metadata, arch: Architecture, tensors: dict) -> dict:
    config = common_config(meta, arch, tensors)
    if scaling := rope_scaling(meta):
        config["rope_scaling"] = scaling
    extra = ARCHITECTURE_CONFIG.get(meta.architecture)
    if extra:
        config.update(extra(meta, config, tensors))
    return config


def common_config(meta: Metadata, arch: Architecture, tensors: dict) -> dict:
    heads = uniform(meta.require_arch("attention.head_count"), "attention.head_count")
    hidden = int(meta.require_arch("embedding_length"))
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require_arch("feed_forward_length")),
        "num_hidden_layers": int(meta.require_arch("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": uniform(meta.arch("attention.head_count_kv", heads), "attention.head_count_kv"),
        "head_dim": head_dim(meta, tensors, heads, hidden),
        "rms_norm_eps": meta.arch("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.arch("rope.freq_base", 10000.0),
        "max_position_embeddings": meta.arch("context_length", 4096),
        "vocab_size": out_features(tensors, "token_embd.weight"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stop_token_ids(meta),
    }


def head_dim(meta: Metadata, tensors: dict, heads: int, hidden: int) -> int:
    if (key_length := meta.arch("attention.key_length")) is not None:
        return int(key_length)
    if "blk.0.attn_q.weight" in tensors:
        return out_features(tensors, "blk.0.attn_q.weight") // heads
    return hidden // heads


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


def llama_config(meta: Metadata, config: dict, tensors: dict) -> dict:
    """Llama 3.1+ files carry their rope scaling only as per-frequency divisors (`rope_freqs`)."""
    if "rope_freqs.weight" not in tensors:
        return {}
    divisors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).ravel()
    scaling = {
        "rope_type": "llama3",
        "factor": float(divisors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(meta.arch("rope.scaling.original_context_length", 8192)),
    }
    wavelengths = 2 * np.pi * config["rope_theta"] ** (np.arange(len(divisors)) / len(divisors))
    if not np.allclose(llama3_divisors(scaling, wavelengths), divisors, rtol=1e-5):
        raise ConversionError("rope_freqs do not follow Llama 3's rope scaling with its usual frequency factors (1 and 4)")
    return {"rope_scaling": scaling}


def llama3_divisors(scaling: dict, wavelengths: np.ndarray) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for these Llama 3 scaling parameters."""
    old, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old / wavelengths - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < old / high, 1.0, np.where(wavelengths > old / low, factor, medium))


def phi3_config(meta: Metadata, config: dict, tensors: dict) -> dict:
    extra = {"original_max_position_embeddings": int(meta.arch("rope.scaling.original_context_length", 4096))}
    if (rope_dims := meta.arch("rope.dimension_count")) is not None:
        extra["partial_rotary_factor"] = int(rope_dims) / (config["hidden_size"] // config["num_attention_heads"])
    if "rope_factors_long.weight" in tensors:
        extra["rope_scaling"] = {
            "type": "longrope",
            "long_factor": factor_list(tensors["rope_factors_long.weight"]),
            "short_factor": factor_list(tensors.get("rope_factors_short.weight", tensors["rope_factors_long.weight"])),
        }
    return extra


def factor_list(tensor) -> list[float]:
    return [float(v) for v in np.asarray(tensor.data, dtype=np.float32).ravel()]


def gemma2_config(meta: Metadata, config: dict, tensors: dict) -> dict:
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": meta.arch("attn_logit_softcapping", 50.0),
        "final_logit_softcapping": meta.arch("final_logit_softcapping", 30.0),
        "query_pre_attn_scalar": query_pre_attn_scalar(meta, config),
        "sliding_window": meta.arch("attention.sliding_window", 4096),
    }


def gemma3_config(meta: Metadata, config: dict, tensors: dict) -> dict:
    if meta.arch("final_logit_softcapping"):
        raise ConversionError(
            "this Gemma 3 file sets final_logit_softcapping, which mlx-lm's gemma3_text module does not apply"
        )
    window = meta.arch("attention.sliding_window")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_pre_attn_scalar(meta, config),
        "rope_local_base_freq": meta.arch("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE),
        "sliding_window": int(window or config["max_position_embeddings"]),
        "sliding_window_pattern": sliding_window_pattern(meta, window),
    }


def query_pre_attn_scalar(meta: Metadata, config: dict) -> int | float:
    if (scale := meta.arch("attention.scale")) is not None:
        scalar = round(1.0 / float(scale) ** 2, 2)
        return int(scalar) if scalar.is_integer() else scalar  # transformers' configs type it int
    if config["num_hidden_layers"] == GEMMA_27B_LAYERS[meta.architecture]:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


def sliding_window_pattern(meta: Metadata, window) -> int:
    """mlx-lm's period p (every p-th layer is global) from the GGUF's period or per-layer flags."""
    if not window:
        return 1
    pattern = meta.arch("attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
    if not isinstance(pattern, list):
        return int(pattern)
    period = next((i + 1 for i, sliding in enumerate(pattern) if not sliding), len(pattern))
    if any(bool(sliding) != ((i + 1) % period != 0) for i, sliding in enumerate(pattern)):
        raise ConversionError(f"sliding-window layers {pattern} do not repeat with one period, which mlx-lm needs")
    return period


ARCHITECTURE_CONFIG = {
    "llama": llama_config,
    "mistral": llama_config,
    "phi3": phi3_config,
    "gemma2": gemma2_config,
    "gemma3": gemma3_config,
}
