"""GGUF tensor data onto MLX arrays.

- Floats stay in their own dtype (BF16 is read as raw bits, never through float16).
- Types whose dequantisation is affine over each 32 consecutive weights, w = scale * q + bias with
  unsigned codes q (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K), keep their codes as MLX affine
  quantisation, group size 32. Scales and biases are float16 where float16 holds every value
  exactly, else float32 (K-quant scales d * sc need up to 17 bits), so that `mx.dequantize` in float32
  equals gguf-py's dequantisation bit for bit.
- MXFP4 keeps its codes and power-of-two scales as MLX's own mxfp4 mode, also bit for bit.
- Every other quantised type is dequantised with gguf-py and requantised (min-max affine, group 32)
  to the fewest MLX bits at or above the type's bits per weight: Q6_K -> 8, Q3_K -> 4, Q2_K -> 3,
  IQ4_XS -> 5, IQ2_XXS -> 3, ... Each weight then differs from gguf-py's value by at most half its
  group's scale, plus float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import mlx.core as mx
import numpy as np
from gguf.constants import GGML_QUANT_SIZES

from errors import ConversionError

Q = gguf.GGMLQuantizationType
GROUP_SIZE = 32
MLX_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16, Q.F64)
# Rows are converted in slices of about this many weights, to bound the temporary memory.
CHUNK_WEIGHTS = 1 << 22


@dataclass(frozen=True)
class AffineGroups:
    """w = scales * codes + biases, one scale and bias per group of 32 consecutive weights."""

    codes: np.ndarray  # uint8, (blocks, block_size)
    scales: np.ndarray  # float32, (blocks, block_size // 32)
    biases: np.ndarray


def half(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 field at `offset` of every block, as a float32 column."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).astype(np.float32)


def nibbles(packed: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout: the low nibbles hold the first half of the weights, the high ones the rest."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def bits_of(packed: np.ndarray) -> np.ndarray:
    """The bits of little-endian bytes, lowest first: bit j of the block's bit field is weight j's."""
    return np.unpackbits(packed, axis=-1, bitorder="little")


def q4_0(blocks: np.ndarray) -> AffineGroups:
    d = half(blocks, 0)
    return AffineGroups(nibbles(blocks[:, 2:18]), d, -8 * d)


def q4_1(blocks: np.ndarray) -> AffineGroups:
    return AffineGroups(nibbles(blocks[:, 4:20]), half(blocks, 0), half(blocks, 2))


def q5_0(blocks: np.ndarray) -> AffineGroups:
    d = half(blocks, 0)
    codes = nibbles(blocks[:, 6:22]) | (bits_of(blocks[:, 2:6]) << 4)
    return AffineGroups(codes, d, -16 * d)


def q5_1(blocks: np.ndarray) -> AffineGroups:
    codes = nibbles(blocks[:, 8:24]) | (bits_of(blocks[:, 4:8]) << 4)
    return AffineGroups(codes, half(blocks, 0), half(blocks, 2))


def q8_0(blocks: np.ndarray) -> AffineGroups:
    d = half(blocks, 0)
    codes = (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return AffineGroups(codes, d, -128 * d)


def k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per-32 scales d * sc and biases -dmin * m (both exact in float32)."""
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    return half(blocks, 0) * sc.astype(np.float32), -(half(blocks, 2) * m.astype(np.float32))


def k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: each 32 bytes hold two sub-blocks, the first in the low nibbles, the next in the high."""
    chunks = qs.reshape(len(qs), -1, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(len(qs), -1)


def q4_k(blocks: np.ndarray) -> AffineGroups:
    return AffineGroups(k_low_nibbles(blocks[:, 16:144]), *k_scales(blocks))


def q5_k(blocks: np.ndarray) -> AffineGroups:
    # Bit j of byte i of qh is the fifth bit of weight i in sub-block j.
    high = np.unpackbits(blocks[:, 16:48, None], axis=-1, bitorder="little").swapaxes(1, 2)
    codes = k_low_nibbles(blocks[:, 48:176]) | (high.reshape(len(blocks), -1) << 4)
    return AffineGroups(codes, *k_scales(blocks))


AFFINE: dict[Q, tuple[int, Callable[[np.ndarray], AffineGroups]]] = {
    Q.Q4_0: (4, q4_0), Q.Q4_1: (4, q4_1), Q.Q5_0: (5, q5_0), Q.Q5_1: (5, q5_1),
    Q.Q8_0: (8, q8_0), Q.Q4_K: (4, q4_k), Q.Q5_K: (5, q5_k),
}


def hf_shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape))


def mlx_quantization(tensor) -> dict | None:
    """MLX's quantisation (group_size, bits, mode) of the layer a tensor becomes; None if it stays float."""
    qtype = tensor.tensor_type
    if qtype in FLOAT_TYPES:
        return None
    check_dequantisable(tensor)
    if len(tensor.shape) < 2:
        return None
    if qtype == Q.MXFP4:
        return {"group_size": GROUP_SIZE, "bits": 4, "mode": "mxfp4"}
    bits = AFFINE[qtype][0] if qtype in AFFINE else requantised_bits(tensor)
    return None if bits is None else {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}


def requantised_bits(tensor) -> int | None:
    block_size, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    bits_per_weight = type_size * 8 / block_size
    return next((bits for bits in MLX_BITS if bits >= bits_per_weight), None)


def check_dequantisable(tensor) -> None:
    if tensor.tensor_type not in gguf.quants._type_traits:  # the registry gguf-py dequantises with
        raise ConversionError(
            f"tensor '{tensor.name}' is stored as {tensor.tensor_type.name}, which gguf-py cannot dequantise; "
            "use a GGUF quantised with a common type (e.g. Q4_K_M, Q8_0)"
        )


def to_mlx(tensor) -> dict[str, mx.array]:
    """`{"weight": array}` for a float tensor, else MLX's quantised `weight`, `scales` (and `biases`)."""
    quantization = mlx_quantization(tensor)
    if quantization is None:
        return {"weight": floats(tensor)}
    if quantization["mode"] == "mxfp4":
        return mxfp4(tensor)
    return affine(tensor, quantization["bits"])


def floats(tensor) -> mx.array:
    data, qtype = np.asarray(tensor.data), tensor.tensor_type
    if qtype == Q.BF16:
        return mx.array(data.view(np.uint16)).view(mx.bfloat16).reshape(hf_shape(tensor))
    if qtype in (Q.F32, Q.F16):
        return mx.array(data).reshape(hf_shape(tensor))
    if qtype == Q.F64:
        return mx.array(data.astype(np.float32)).reshape(hf_shape(tensor))
    check_dequantisable(tensor)
    return mx.array(gguf.quants.dequantize(data, qtype)).reshape(hf_shape(tensor))


def row_chunks(tensor):
    """The tensor's bytes, one row per output feature, a slice of rows at a time."""
    rows = np.asarray(tensor.data).reshape(-1, tensor.data.shape[-1])
    step = max(1, CHUNK_WEIGHTS // int(tensor.shape[0]))
    return (rows[start:start + step] for start in range(0, len(rows), step))


def affine(tensor, bits: int) -> dict[str, mx.array]:
    # Damaged scales (NaN, Inf) are counted and named by the writer's numeric check, not warned of here.
    with np.errstate(invalid="ignore", over="ignore"):
        parts = [affine_rows(rows, tensor.tensor_type, bits) for rows in row_chunks(tensor)]
    codes, scales, biases = (np.concatenate(column) for column in zip(*parts))
    dtype = exact_dtype(scales, biases)
    return mlx_parts(tensor, weight=pack(codes, bits), scales=scales.astype(dtype), biases=biases.astype(dtype))


def mlx_parts(tensor, **arrays: np.ndarray) -> dict[str, mx.array]:
    shape = hf_shape(tensor)[:-1]
    return {name: mx.array(array).reshape(*shape, -1) for name, array in arrays.items()}


def affine_rows(rows: np.ndarray, qtype: Q, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, biases) of a slice of rows: the file's own codes, or requantised ones."""
    if qtype not in AFFINE:
        return requantise(gguf.quants.dequantize(rows, qtype), bits)
    _, type_size = GGML_QUANT_SIZES[qtype]
    groups = AFFINE[qtype][1](rows.reshape(-1, type_size))
    n = len(rows)
    return groups.codes.reshape(n, -1), groups.scales.reshape(n, -1), groups.biases.reshape(n, -1)


def requantise(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max affine codes per group of 32: each weight moves by at most half its group's scale."""
    groups = values.reshape(len(values), -1, GROUP_SIZE)
    low, high = groups.min(axis=-1, keepdims=True), groups.max(axis=-1, keepdims=True)
    scales = (high - low) / np.float32(2**bits - 1)
    steps = (groups - low) / np.where(scales == 0, np.float32(1), scales)
    codes = np.clip(np.rint(steps), 0, 2**bits - 1).astype(np.uint8)
    return codes.reshape(len(values), -1), scales[..., 0], low[..., 0]


def mxfp4(tensor) -> dict[str, mx.array]:
    """ggml's MXFP4 doubles the e2m1 values and halves the e8m0 scale: the same numbers as MLX's mxfp4."""
    blocks = [rows.reshape(-1, 17) for rows in row_chunks(tensor)]
    codes = np.concatenate([nibbles(b[:, 1:]) for b in blocks]).reshape(-1, int(tensor.shape[0]))
    scales = np.concatenate([b[:, 0] for b in blocks]).reshape(len(codes), -1)
    return mlx_parts(tensor, weight=pack(codes, 4), scales=scales)


def exact_dtype(*arrays: np.ndarray):
    """float16 if it holds every value exactly, else float32."""
    for array in arrays:
        with np.errstate(over="ignore"):
            if not np.array_equal(array.astype(np.float16).astype(np.float32), array):
                return np.float32
    return np.float16


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: each row's codes as one little-endian bit stream, read as uint32 words."""
    packed = whole_codes_per_byte(codes, bits) if 8 % bits == 0 else eight_codes_per_word(codes, bits)
    return np.ascontiguousarray(packed).reshape(len(codes), -1).view(np.uint32)


def whole_codes_per_byte(codes: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    packed = codes[:, 0::per_byte].copy()
    for j in range(1, per_byte):
        packed |= codes[:, j::per_byte] << np.uint8(bits * j)
    return packed


def eight_codes_per_word(codes: np.ndarray, bits: int) -> np.ndarray:
    """3, 5 or 6 bits: eight codes fill `bits` bytes exactly; build them in a uint64 and keep those bytes."""
    eights = codes.reshape(-1, 8)
    words = np.zeros(len(eights), dtype=np.uint64)
    for i in range(8):
        words |= eights[:, i].astype(np.uint64) << np.uint64(bits * i)
    return words.view(np.uint8).reshape(-1, 8)[:, :bits]
