"""Shared pieces for sources that carry an HF-style config.json and tokenizer files beside the weights
(SafeTensors, PyTorch, ONNX, Core ML, MLX): config normalisation, tokenizer copying, the SourceModel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from converters.errors import ConversionError, UnsupportedArchitectureError
from converters.source import SourceModel, Tensors

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# model_type values whose mlx-lm module the equivalence tests cover.
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3_text"}


def sidecar_folder(source: Path) -> Path:
    """Where config and tokenizer files live: the folder itself, or the file's folder."""
    return source if source.is_dir() else source.parent


def read_config(folder: Path, source: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source}: no config.json beside the weights; put the model's config.json in {folder}")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
    return normalise_config(config, source)


def normalise_config(config: dict, source: Path) -> dict:
    """What mlx-lm needs spelled its way; e.g. transformers 5 writes `rope_parameters`, not `rope_theta`."""
    config = dict(config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise UnsupportedArchitectureError(f"{source}: model_type '{model_type}' is not supported yet (supported: {supported})")
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config:
        apply_rope_parameters(config, rope)
    return config


def apply_rope_parameters(config: dict, rope: dict) -> None:
    # Gemma 3 nests one set per attention kind; the others hold a single set.
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention")
    if "rope_theta" in full:
        config["rope_theta"] = full["rope_theta"]
    if local and "rope_theta" in local:
        config["rope_local_base_freq"] = local["rope_theta"]
    if full.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}


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
              quantization: dict | None = None) -> SourceModel:
    """A SourceModel for weights whose config and tokenizer sit beside them."""
    folder = sidecar_folder(source)
    return SourceModel(
        architecture=config["model_type"],
        config=config,
        parameters=parameters,
        tensors=tensors,
        save_tokenizer=copier(tokenizer_files(folder, source)),
        quantization=quantization,
    )
