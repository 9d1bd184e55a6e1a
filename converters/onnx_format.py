"""ONNX reader: the initializers of an exported decoder graph, back into HF-named MLX tensors.

Reading the initializers (external data memory-mapped in place) is in `onnx_initializers`, which node
uses each one and so which module and role it has in `onnx_graph`, the plan that maps them onto the
parameters mlx-lm expects in `onnx_plan`, and MatMulNBits weights in `onnx_nbits`.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from tqdm import tqdm

from converters.hf import hf_source, read_config, sidecar_folder
from converters.onnx_initializers import Initializers
from converters.onnx_plan import Piece, build_plan, expected_parameters
from converters.source import SourceModel, quantization_block
from errors import ConversionError


def read(path: Path) -> SourceModel:
    model_file = onnx_file(path)
    config = read_config(sidecar_folder(path), path)
    graph = load_graph(model_file)
    data = Initializers(model_file, graph)
    expected = expected_parameters(config, path)
    plan = build_plan(graph, data, expected, config, model_file)
    parameters = sum(math.prod(shape) for shape in expected.values())
    return hf_source(path, config, lambda: iter_tensors(plan), parameters, layer_quantization(plan))


# ---- files ----

def onnx_file(path: Path) -> Path:
    """The model's .onnx file: the path itself, the folder's only .onnx file, or its model.onnx."""
    if path.is_file():
        return path
    files = sorted(p for p in path.iterdir() if p.suffix == ".onnx" and p.is_file())
    if len(files) == 1:
        return files[0]
    if path / "model.onnx" in files:
        return path / "model.onnx"
    names = ", ".join(p.name for p in files) or "none"
    raise ConversionError(f"{path}: several .onnx files ({names}) and no model.onnx; pass the one to convert")


def load_graph(model_file: Path) -> onnx.GraphProto:
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise assorted errors on damaged files
        raise ConversionError(f"{model_file}: unreadable ONNX model ({type(exc).__name__}); the file is corrupt or truncated, export or download it again") from exc
    if not model.graph.initializer:
        raise ConversionError(f"{model_file}: the ONNX graph holds no weights (no initializers); export it with its parameters")
    return model.graph


# ---- output ----

def layer_quantization(plan: list[Piece]) -> dict | None:
    """MLX's quantisation block for the layers kept quantised; layers without scales stay float."""
    return quantization_block({
        piece.name.rsplit(".", 1)[0]: {"group_size": piece.quantized[0], "bits": piece.quantized[1], "mode": "affine"}
        for piece in plan if piece.quantized
    })


def iter_tensors(plan: list[Piece]):
    for piece in tqdm(plan, desc="tensors", unit="tensor", leave=False):
        yield from piece.load()
