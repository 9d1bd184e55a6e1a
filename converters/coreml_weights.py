"""Core ML weights as MLX tensors: dense, or MLX affine with the codes kept.

Compressed weights: block-wise (`constexpr_blockwise_shift_scale`) and per-channel affine
(`constexpr_affine_dequantize`) int4/int8 whose blocks run along the input dimension in multiples of 32
become MLX affine 4/8-bit with the codes kept; everything else (palettes, sparse, odd blocks) is
dequantised with coremltools' own `decompress`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from converters.coreml_matching import Placement
from converters.coreml_program import Program, data_type_name, tensor_shape
from converters.source import quantization_block
from errors import ConversionError

MLX_GROUP_SIZES = (128, 64, 32)
CODE_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8}
SIGNED_CODES = {"INT4", "INT8"}


@dataclass(frozen=True)
class AffineLayout:
    """How an int4/int8 affine source becomes MLX affine: codes + shift, scales repeated per group."""

    bits: int
    group_size: int
    shift: int
    repeats: tuple[int, int]  # each source block covers this many MLX groups (rows, groups along a row)


@dataclass
class AffineSource:
    code_type: str
    scale: np.ndarray  # one per block: (rows / block rows, columns / block columns)
    offset: np.ndarray | None
    codes: Callable[[], np.ndarray]


@dataclass
class PlannedTensor:
    program: Program
    placement: Placement
    layout: AffineLayout | None  # None: written dense

    @property
    def module(self) -> str:
        return self.placement.expected.name.rpartition(".")[0]

    def make(self):
        if self.layout is None:
            yield self.placement.expected.name, mx.array(dense_value(self.program, self.placement))
            return
        parts = mlx_affine(affine_source(self.program, self.placement.source.op), self.layout)
        for suffix, array in zip(("weight", "scales", "biases"), parts):
            yield f"{self.module}.{suffix}", mx.array(array)


def planned_tensor(program: Program, placement: Placement) -> PlannedTensor:
    return PlannedTensor(program, placement, kept_layout(program, placement))


def dense_value(program: Program, placement: Placement) -> np.ndarray:
    values = source_values(program, placement.source.op)
    if placement.transpose:
        values = values.T
    values = values.reshape(placement.expected.shape)
    if placement.offset:
        values = values - values.dtype.type(placement.offset)
    return np.ascontiguousarray(values)


def source_values(program: Program, op) -> np.ndarray:
    if op.type == "const":
        return program.read_value(op.attributes["val"], f"constant '{op.outputs[0].name}'")
    arguments = {key: argument_value(program, op, key) for key in (*op.inputs, *op.attributes) if key != "name"}
    return decompressed(op.type, arguments, program.path, op.outputs[0].name)


def argument_value(program: Program, op, key: str) -> np.ndarray:
    """An argument of a constexpr op: an attribute (iOS16), an inline value, or another constant (iOS18)."""
    what = f"'{key}' of '{op.outputs[0].name}'"
    if key in op.attributes:
        return program.read_value(op.attributes[key], what)
    binding = op.inputs[key].arguments[0]
    if binding.WhichOneof("binding") == "value":
        return program.read_value(binding.value, what)
    return source_values(program, program.producer(binding.name, op))


def argument_type(program: Program, op, key: str) -> str:
    if key in op.attributes:
        return data_type_name(op.attributes[key].type.tensorType.dataType)
    binding = op.inputs[key].arguments[0]
    if binding.WhichOneof("binding") == "value":
        return data_type_name(binding.value.type.tensorType.dataType)
    return data_type_name(program.producer(binding.name, op).outputs[0].type.tensorType.dataType)


def decompressed(op_type: str, args: dict, path: Path, name: str) -> np.ndarray:
    """coremltools' own dequantisation of a constexpr op, from its numpy arguments."""
    from coremltools.converters.mil.mil.ops.defs.iOS16 import constexpr_ops as ios16
    from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as ios18

    if op_type == "constexpr_blockwise_shift_scale":
        return ios18.constexpr_blockwise_shift_scale.decompress(args["data"], args["scale"], args.get("offset"))
    if op_type == "constexpr_affine_dequantize":
        return ios16.constexpr_affine_dequantize.decompress(args["quantized_data"], args["zero_point"], args["scale"], int(args["axis"]))
    if op_type == "constexpr_lut_to_dense" and "shape" in args:
        return ios16.constexpr_lut_to_dense.decompress(args["lut"], args["indices"], args["shape"])
    if op_type == "constexpr_lut_to_dense":
        return ios18.constexpr_lut_to_dense.decompress(args["indices"], args["lut"], args.get("vector_axis"))
    if op_type == "constexpr_sparse_to_dense" and "shape" in args:
        return ios16.constexpr_sparse_to_dense.decompress(args["nonzero_data"], args["mask"], args["shape"])
    if op_type == "constexpr_sparse_to_dense":
        return ios18.constexpr_sparse_to_dense.decompress(args["nonzero_data"], args["mask"])
    raise ConversionError(f"{path}: '{name}' is compressed with {op_type}, which Impetus cannot read yet")


def kept_layout(program: Program, placement: Placement) -> AffineLayout | None:
    """The MLX affine layout that holds exactly the source's codes and values, if there is one."""
    if placement.transpose or placement.expected.kind not in ("matrix", "embedding") or len(placement.source.shape) != 2:
        return None
    source = affine_source(program, placement.source.op)
    return affine_layout(source, placement.source.shape) if source else None


def affine_source(program: Program, op) -> AffineSource | None:
    """Codes (read when called), code type, scale and offset per block of an int4/int8 affine constexpr."""
    if op.type == "constexpr_blockwise_shift_scale" and argument_type(program, op, "data") in CODE_BITS:
        offset = argument_value(program, op, "offset") if "offset" in op.inputs else None
        return AffineSource(argument_type(program, op, "data"), argument_value(program, op, "scale"), offset,
                            lambda: argument_value(program, op, "data"))
    if op.type == "constexpr_affine_dequantize" and argument_type(program, op, "quantized_data") in CODE_BITS:
        return per_channel_source(program, op)
    return None


def per_channel_source(program: Program, op) -> AffineSource | None:
    """iOS16 affine: one scale and zero point per output row (axis 0), or one for the whole tensor."""
    scale, zero_point = argument_value(program, op, "scale"), argument_value(program, op, "zero_point")
    if scale.size > 1 and int(argument_value(program, op, "axis")) != 0:
        return None
    rows = tensor_shape(op.outputs[0].type)[0] if scale.size > 1 else 1
    return AffineSource(argument_type(program, op, "quantized_data"), scale.reshape(rows, 1),
                        np.broadcast_to(zero_point.reshape(-1, 1), (rows, 1)),
                        lambda: argument_value(program, op, "quantized_data"))


def affine_layout(source: AffineSource, shape: tuple[int, int]) -> AffineLayout | None:
    """w = scale * (code - offset) is MLX's w = scales * q + biases with q = code + shift and
    biases = -scale * (offset + shift): exact when a block spans whole MLX groups along the input axis
    and those biases are representable in the scales' dtype."""
    bits = CODE_BITS[source.code_type]
    block_rows, block_columns = shape[0] // source.scale.shape[0], shape[1] // source.scale.shape[1]
    group = next((g for g in MLX_GROUP_SIZES if block_columns % g == 0), None)
    if group is None or source.scale.dtype not in (np.float16, np.float32):
        return None
    shift = 1 << (bits - 1) if source.code_type in SIGNED_CODES else 0
    exact = exact_biases(source, shift)
    if not np.array_equal(exact.astype(source.scale.dtype).astype(np.float64), exact):
        return None
    return AffineLayout(bits, group, shift, (block_rows, block_columns // group))


def exact_biases(source: AffineSource, shift: int) -> np.ndarray:
    offset = 0.0 if source.offset is None else source.offset.astype(np.float64)
    return -source.scale.astype(np.float64) * (offset + shift)


def mlx_affine(source: AffineSource, layout: AffineLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed weight, scales, biases) in MLX's layout."""
    biases = exact_biases(source, layout.shift).astype(source.scale.dtype)
    codes = source.codes().astype(np.int64) + layout.shift
    return pack(codes, layout.bits), repeat_blocks(source.scale, layout.repeats), repeat_blocks(biases, layout.repeats)


def repeat_blocks(values: np.ndarray, counts: tuple[int, int]) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(np.repeat(values, counts[0], axis=0), counts[1], axis=1))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's layout: 32 // bits codes per uint32 along the last axis, the first in the lowest bits."""
    per_word = 32 // bits
    words = codes.astype(np.uint32).reshape(codes.shape[0], -1, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    return np.bitwise_or.reduce(words << shifts, axis=-1)


def layer_quantization(tensors: list[PlannedTensor]) -> dict | None:
    return quantization_block({
        t.module: {"group_size": t.layout.group_size, "bits": t.layout.bits, "mode": "affine"} for t in tensors if t.layout
    })
