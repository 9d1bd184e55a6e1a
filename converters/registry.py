"""The registry of source formats.

A format is detected by content with a cheap, stdlib-only sniffer; its converter module (which
imports the heavy libraries) is imported only when a conversion actually runs. Each converter
module exposes `read(path) -> SourceModel`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from converters import sniff
from errors import ConversionError, UnknownFormatError


@dataclass(frozen=True)
class Format:
    name: str
    # Bump when a converter's output changes, so that old cache entries are not reused.
    version: str
    sniff: Callable[[Path], bool]
    module: str
    looks_for: str

    def read(self, path: Path):
        return importlib.import_module(self.module).read(path)


FORMATS: list[Format] = []


def register(fmt: Format) -> Format:
    FORMATS.append(fmt)
    return fmt


register(Format("gguf", "2", sniff.is_gguf, "converters.gguf_format", "GGUF magic bytes 'GGUF'"))
register(Format("safetensors", "1", sniff.is_hf_safetensors, "converters.safetensors_format",
                "a safetensors header, or a folder with config.json and *.safetensors"))
register(Format("pytorch", "1", sniff.is_pytorch, "converters.pytorch_format",
                "a PyTorch zip (*/data.pkl) or pickle, or a folder with pytorch_model*.bin / consolidated.*.pth"))
register(Format("onnx", "1", sniff.is_onnx, "converters.onnx_format", "an ONNX ModelProto, or a folder with a .onnx file"))
register(Format("coreml", "1", sniff.is_coreml, "converters.coreml_format",
                "a Core ML .mlpackage (Manifest.json) or .mlmodel"))
register(Format("mlx", "1", sniff.is_mlx, "converters.mlx_format",
                "an MLX folder (config.json + safetensors with a quantization block or MLX metadata) or an .npz"))


def detect(path: Path) -> Format:
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    matches = [fmt for fmt in FORMATS if fmt.sniff(path)]
    if len(matches) > 1:
        names = ", ".join(fmt.name for fmt in matches)
        raise UnknownFormatError(f"{path}: ambiguous input, it looks like several formats ({names})")
    if not matches:
        wanted = "; ".join(f"{fmt.name}: {fmt.looks_for}" for fmt in FORMATS)
        raise UnknownFormatError(
            f"{path}: not a model format Impetus knows. Looked for {wanted}; found {sniff.describe(path)}"
        )
    return matches[0]
