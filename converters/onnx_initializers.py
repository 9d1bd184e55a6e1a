"""The initializers of an ONNX graph, read in place.

External data is checked against each tensor's shape up front, memory-mapped in place when read, and
only from inside the model's folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from errors import ConversionError

# Packed 4-bit ONNX element types: two values per byte.
PACKED_NIBBLE_TYPES = {TensorProto.INT4, TensorProto.UINT4}


class Initializers:
    """The graph's initializers by name; external data is checked up front and memory-mapped when read."""

    def __init__(self, model_file: Path, graph: onnx.GraphProto):
        self.model_file = model_file
        self.folder = Path(os.path.normpath(model_file.parent.absolute()))
        self.protos = {tensor.name: tensor for tensor in graph.initializer}
        for tensor in self.protos.values():
            self.check(tensor)

    def __contains__(self, name: str) -> bool:
        return name in self.protos

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.protos[name].dims)

    def array(self, name: str) -> np.ndarray:
        tensor = self.protos[name]
        if tensor.data_location == TensorProto.EXTERNAL:
            file, offset = self.external_file(tensor), int(external_info(tensor).get("offset", 0))
            return mapped_array(file, offset, tensor, self.dtype(tensor))
        try:
            return numpy_helper.to_array(tensor)
        except ValueError as exc:
            raise ConversionError(f"{self.model_file}: tensor '{name}' has damaged data ({exc})") from exc

    def dtype(self, tensor: TensorProto) -> np.dtype:
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{self.model_file}: tensor '{tensor.name}' has element type {type_name(tensor.data_type)}, which is not supported") from exc

    def stored_bytes(self, tensor: TensorProto) -> int:
        count = math.prod(tensor.dims)
        if tensor.data_type in PACKED_NIBBLE_TYPES:
            return (count + 1) // 2
        return count * self.dtype(tensor).itemsize

    def check(self, tensor: TensorProto) -> None:
        needed = self.stored_bytes(tensor)
        if tensor.data_location == TensorProto.EXTERNAL:
            self.check_external(tensor, needed)
        elif tensor.raw_data and len(tensor.raw_data) != needed:
            raise ConversionError(
                f"{self.model_file}: tensor '{tensor.name}' has {len(tensor.raw_data)} bytes of data for shape "
                f"{list(tensor.dims)}, which needs {needed}; the file is damaged"
            )

    def check_external(self, tensor: TensorProto, needed: int) -> None:
        file, info = self.external_file(tensor), external_info(tensor)
        length = int(info.get("length", needed))
        if length != needed:
            raise ConversionError(f"{self.model_file}: tensor '{tensor.name}' declares {length} bytes of external data for shape {list(tensor.dims)}, which needs {needed}")
        end, size = int(info.get("offset", 0)) + needed, file.stat().st_size
        if end > size:
            raise ConversionError(f"{file}: truncated, tensor '{tensor.name}' needs bytes up to {end} but the file has {size}; copy or download it again")

    def external_file(self, tensor: TensorProto) -> Path:
        """The data file, refused unless its location stays inside the model's folder (no `..`, no absolute path)."""
        location = external_info(tensor).get("location", "")
        file = Path(os.path.normpath(self.folder / location))
        if not location or file == self.folder or not file.is_relative_to(self.folder):
            raise ConversionError(
                f"{self.model_file}: tensor '{tensor.name}' points at external data '{location}' outside the model's folder; "
                f"refusing to read it (keep the data file beside the .onnx file)"
            )
        if not file.is_file():
            raise ConversionError(f"{self.model_file}: external data file '{location}' for tensor '{tensor.name}' is missing; put it in {self.folder}")
        return file


def type_name(data_type: int) -> str:
    return TensorProto.DataType.Name(data_type) if data_type in TensorProto.DataType.values() else str(data_type)


def external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def mapped_array(file: Path, offset: int, tensor: TensorProto, dtype: np.dtype) -> np.ndarray:
    count = math.prod(tensor.dims)
    if count == 0:
        return np.empty(tuple(tensor.dims), dtype)
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(tuple(tensor.dims))
