"""Formats x architectures: a tiny random transformers model, exported by each ecosystem's own
exporter, converted by Impetus, gives the same logits in MLX as in torch."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from converters.pipeline import ensure_converted
from tests.tiny_models import HF_ARCH_NAMES, IDS, build_hf_model, mlx_logits, torch_logits

FORMATS = ["safetensors", "pytorch", "onnx", "coreml", "gguf", "mlx"]
TOLERANCE = 1e-3


def reference(exporter, model, arch: str) -> np.ndarray:
    if hasattr(exporter, "reference_logits"):
        return exporter.reference_logits(model, arch, IDS)
    return torch_logits(model, IDS)


@pytest.mark.parametrize("arch", HF_ARCH_NAMES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_converted_model_matches_torch(fmt, arch, tmp_path, store):
    exporter = importlib.import_module(f"tests.exporters.{fmt}")
    model = build_hf_model(arch)
    source = exporter.export(model, arch, tmp_path)

    result = ensure_converted(source, store)
    assert result.entry.format == fmt

    assert np.abs(mlx_logits(result.path) - reference(exporter, model, arch)).max() <= TOLERANCE
