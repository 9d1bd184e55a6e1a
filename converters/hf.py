"""Shared pieces for sources that carry an HF-style config.json and tokenizer files beside the weights
(SafeTensors, PyTorch, ONNX, Core ML, MLX): config normalisation, tokenizer copying, the SourceModel."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from converters.source import SourceModel, Tensors
from errors import ConversionError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# model_type values whose mlx-lm module the equivalence tests cover.
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3_text"}
# mlx-lm modules that place sliding-window layers by `sliding_window_pattern` rather than `layer_types`.
WINDOW_PATTERN_MODEL_TYPES = {"gemma3", "gemma3_text"}


def sidecar_folder(source: Path) -> Path:
    """Where config and tokenizer files live: the folder itself, or the file's folder."""
    return source if source.is_dir() else source.parent


def read_config(folder: Path, source: Path, model_types: set[str] | None = SUPPORTED_MODEL_TYPES) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source}: no config.json beside the weights; put the model's config.json in {folder}")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: not a model config (expected a JSON object)")
    return normalise_config(config, source, model_types)


def normalise_config(config: dict, source: Path, model_types: set[str] | None = SUPPORTED_MODEL_TYPES) -> dict:
    """What mlx-lm needs spelled its way; e.g. transformers 5 writes `rope_parameters`, not `rope_theta`.

    `model_types=None` accepts any model type (MLX checkpoints, which mlx-lm itself validates).
    """
    check_model_type(config, source, model_types)
    config = normalise_fields(config, source)
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = normalise_fields(config["text_config"], source)
    return config


def check_model_type(config: dict, source: Path, model_types: set[str] | None) -> None:
    model_type = config.get("model_type")
    if model_types is not None and model_type not in model_types:
        supported = ", ".join(sorted(model_types))
        raise UnsupportedArchitectureError(f"{source}: model_type '{model_type}' is not supported yet (supported: {supported})")


def normalise_fields(config: dict, source: Path) -> dict:
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        apply_rope_parameters(config, rope)
    if config.get("sliding_window_pattern") is None and "_sliding_window_pattern" in config:
        config["sliding_window_pattern"] = config["_sliding_window_pattern"]
    if config.get("model_type") in WINDOW_PATTERN_MODEL_TYPES and config.get("layer_types"):
        config["sliding_window_pattern"] = window_pattern(config["layer_types"], source)
    if window_ignored(config):
        cap_context_at_window(config, source)
    return config


def window_ignored(config: dict) -> bool:
    """Whether the source slides an attention window that mlx-lm's module for it does not."""
    kind, window = config.get("model_type"), config.get("sliding_window")
    if not window:
        return False
    return (kind == "gemma2" or (kind in ("mistral", "llama") and not config.get("layer_types"))
            or (kind == "qwen2" and bool(config.get("use_sliding_window"))))


def cap_context_at_window(config: dict, source: Path) -> None:
    # Within the window full attention is exactly the source's attention; beyond it mlx-lm would
    # silently differ, so the context ends there (as vLLM and MLC do for Gemma 2).
    window, context = config["sliding_window"], config.get("max_position_embeddings")
    if context is not None and context <= window:
        return
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("type") or scaling.get("rope_type", "default")) not in ("default", "linear"):
        # These rope variants read max_position_embeddings, so it cannot be lowered without changing them.
        log.warning("%s: mlx-lm's %s module has no sliding-window attention; outputs beyond %d tokens differ from the source",
                    source, config["model_type"], window)
        return
    log.warning("%s: mlx-lm's %s module has no sliding-window attention; context capped at its window of %d tokens",
                source, config["model_type"], window)
    config["max_position_embeddings"] = window


def apply_rope_parameters(config: dict, rope: dict) -> None:
    """Lift transformers-5 `rope_parameters` into the flat keys mlx-lm reads; keys already set win."""
    # Gemma 3 nests one set per attention kind; the others hold a single set.
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention")
    set_missing(config, "rope_theta", full.get("rope_theta"))
    set_missing(config, "partial_rotary_factor", full.get("partial_rotary_factor"))
    if local:
        set_missing(config, "rope_local_base_freq", local.get("rope_theta"))
    if full.get("rope_type", "default") != "default":
        set_missing(config, "rope_scaling", rope_scaling(full))


def set_missing(config: dict, key: str, value) -> None:
    if config.get(key) is None and value is not None:
        config[key] = value


def rope_scaling(parameters: dict) -> dict:
    # mlx-lm's phi3 reads `type`, its shared rope code reads `type` or `rope_type`.
    scaling = {k: v for k, v in parameters.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return {**scaling, "type": parameters["rope_type"]}


def window_pattern(layer_types: list[str], source: Path) -> int:
    """mlx-lm's Gemma 3 knows only "every n-th layer is global"; find n, or refuse other layouts."""
    if "full_attention" not in layer_types:
        raise UnsupportedArchitectureError(f"{source}: layer_types has no full_attention layer; mlx-lm's gemma3 module needs one")
    period = layer_types.index("full_attention") + 1
    regular = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(layer_types))]
    if layer_types != regular:
        raise UnsupportedArchitectureError(
            f"{source}: layer_types {layer_types} is not one global layer every {period}; mlx-lm's gemma3 module cannot express it"
        )
    return period


def tokenizer_files(folder: Path, source: Path) -> list[Path]:
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in files):
        raise ConversionError(
            f"{source}: no tokenizer beside the weights (looked for tokenizer.json, tokenizer.model or vocab.json in {folder})"
        )
    return files


def copier(files: list[Path]) -> Callable[[Path], None]:
    def save(dest: Path) -> None:
        for file in files:
            shutil.copy2(file, dest / file.name)

    return save


def hf_source(source: Path, config: dict, tensors: Callable[[], Tensors], parameters: int,
              quantization: dict | None = None, adopt_files: Callable[[], list[Path]] | None = None) -> SourceModel:
    """A SourceModel for weights whose config and tokenizer sit beside them."""
    folder = sidecar_folder(source)
    return SourceModel(
        architecture=config["model_type"],
        config=config,
        parameters=parameters,
        tensors=tensors,
        save_tokenizer=copier(tokenizer_files(folder, source)),
        quantization=quantization,
        source=source,
        adopt_files=adopt_files,
    )
