"""MatMulNBits (com.microsoft) weights.

Weights with 4 or 8 bits and block size 32, 64 or 128 are repacked into MLX's affine layout without
dequantising (ONNX Runtime packs codes low nibble first, as MLX does); other block sizes are dequantised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import onnx
from onnx import TensorProto

from converters.onnx_graph import attribute
from converters.onnx_initializers import Initializers
from errors import ConversionError

MLX_GROUP_SIZES = {32, 64, 128}
MLX_NATIVE_BITS = {4, 8}


@dataclass(frozen=True)
class NBits:
    node: onnx.NodeProto
    n: int
    k: int
    bits: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def native(self) -> bool:
        # MLX's groups must tile K exactly, with no padded last block.
        return self.bits in MLX_NATIVE_BITS and self.block_size in MLX_GROUP_SIZES and self.k % self.block_size == 0

    def input(self, slot: int) -> str:
        return self.node.input[slot] if len(self.node.input) > slot else ""


def nbits_of(node: onnx.NodeProto) -> NBits:
    values = {name: attribute(node, name) for name in ("N", "K", "block_size")}
    if None in values.values():
        raise ConversionError(f"MatMulNBits node '{node.name}' lacks its N, K or block_size attribute")
    return NBits(node, int(values["N"]), int(values["K"]), int(attribute(node, "bits", 4)), int(values["block_size"]))


def check_nbits(spec: NBits, data: Initializers) -> None:
    """The node's initializers hold as many codes, scales and zero points as its N, K, bits and block size need."""
    label = f"{data.model_file}: MatMulNBits node '{spec.node.name}'"
    if spec.bits not in (2, 4, 8):
        raise ConversionError(f"{label} has {spec.bits}-bit weights; only 2, 4 and 8 bits are supported")
    for slot, size in nbits_sizes(spec, data).items():
        name = spec.input(slot)
        if name not in data:
            raise ConversionError(f"{label} reads '{name}', which is not an initializer")
        if math.prod(data.shape(name)) != size:
            raise ConversionError(f"{label}: '{name}' has shape {list(data.shape(name))}, but N={spec.n}, K={spec.k}, "
                                  f"{spec.bits} bits and block {spec.block_size} need {size} values; the file is damaged")


def nbits_sizes(spec: NBits, data: Initializers) -> dict[int, int]:
    """How many values each input slot must hold: packed codes, scales, and zero points (packed when uint8)."""
    sizes = {1: spec.n * spec.blocks * spec.block_size * spec.bits // 8, 2: spec.n * spec.blocks}
    if spec.input(3):
        zero_points = data.protos.get(spec.input(3))
        packed = zero_points is not None and zero_points.data_type == TensorProto.UINT8
        sizes[3] = spec.n * (-(-spec.blocks * spec.bits // 8) if packed else spec.blocks)
    return sizes


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """(rows, bytes) of little-endian packed codes -> (rows, values) uint8, lowest bits first."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    shifted = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return np.stack(shifted, axis=-1).reshape(packed.shape[0], -1)


def nbits_scales(spec: NBits, data: Initializers) -> np.ndarray:
    return np.asarray(data.array(spec.input(2))).reshape(spec.n, spec.blocks)


def nbits_zero_points(spec: NBits, data: Initializers) -> np.ndarray:
    """(N, blocks) float32 zero points: packed like the codes, given as floats, or the default 2^(bits-1)."""
    if not spec.input(3):
        return np.full((spec.n, spec.blocks), 2 ** (spec.bits - 1), np.float32)
    zero_points = np.asarray(data.array(spec.input(3)))
    if zero_points.dtype == np.uint8:
        return unpack_codes(zero_points.reshape(spec.n, -1), spec.bits)[:, : spec.blocks].astype(np.float32)
    return zero_points.reshape(spec.n, spec.blocks).astype(np.float32)


def nbits_codes(spec: NBits, data: Initializers) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(data.array(spec.input(1)), dtype=np.uint8).reshape(spec.n, -1))


def native_nbits(module: str, spec: NBits, data: Initializers) -> list[tuple[str, mx.array]]:
    """MLX affine weight/scales/biases: the same codes, (q - z) * s rewritten as q * s + (-z * s)."""
    scales = nbits_scales(spec, data)
    biases = -nbits_zero_points(spec, data) * scales.astype(np.float32)
    codes = nbits_codes(spec, data).view(np.uint32)
    return [(f"{module}.weight", mx.array(codes)), (f"{module}.scales", mx.array(scales)),
            (f"{module}.biases", mx.array(biases.astype(scales.dtype)))]


def dequantized_nbits(spec: NBits, data: Initializers) -> mx.array:
    """(N, K) float weights, computed as ONNX Runtime does: (q - z) * s per block."""
    scales = nbits_scales(spec, data)
    codes = unpack_codes(nbits_codes(spec, data), spec.bits)[:, : spec.blocks * spec.block_size].astype(np.float32)
    offsets = codes.reshape(spec.n, spec.blocks, spec.block_size) - nbits_zero_points(spec, data)[:, :, None]
    weights = (offsets * scales.astype(np.float32)[:, :, None]).reshape(spec.n, -1)[:, : spec.k]
    return mx.array(weights.astype(scales.dtype))
