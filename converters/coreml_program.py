"""The Core ML program: its spec, main operations and weights folder, read from a package's
Manifest.json or a lone .mlmodel; MIL values read through coremltools; and the blob files checked
for damage before anything is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import ConversionError

MANIFEST_AUTHOR = "com.apple.CoreML"
DATA_TYPE_BITS = {"FLOAT32": 32, "FLOAT16": 16, "BFLOAT16": 16, "INT32": 32, "UINT32": 32, "INT16": 16, "UINT16": 16,
                  "INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4, "UINT6": 6, "UINT3": 3, "UINT2": 2, "UINT1": 1}


@dataclass
class Program:
    path: Path
    operations: list
    weights_dir: Path | None
    context: object = None
    producers: dict = field(default_factory=dict)

    def __post_init__(self):
        self.producers = {op.outputs[0].name: op for op in self.operations if op.outputs}

    def producer(self, name: str, reader):
        if name not in self.producers:
            raise ConversionError(f"{self.path}: '{reader.outputs[0].name}' reads '{name}', which the program never defines")
        return self.producers[name]

    def read_value(self, value_spec, what: str) -> np.ndarray:
        """A MIL value as numpy, through coremltools' own deserialiser (blob files included)."""
        from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

        if self.context is None:
            self.context = TranscriptionContext(str(self.weights_dir or ""))
        try:
            return np.asarray(_load_value(self.context, value_spec))
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ConversionError(f"{blob_file_of(self, value_spec) or self.path}: cannot read {what} ({exc}); "
                                  "the weights are damaged, export the package again") from exc


def load_program(path: Path) -> Program:
    spec_file, weights_dir = package_parts(path) if path.is_dir() else (path, None)
    spec = parse_spec(spec_file)
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise ConversionError(f"{path}: holds a Core ML '{kind}' model, not an ML Program; export it again with "
                              "coremltools.convert(..., convert_to='mlprogram')")
    return Program(path, main_operations(spec, path), weights_dir)


def package_parts(package: Path) -> tuple[Path, Path | None]:
    """(model spec file, weights folder) from Manifest.json.

    Read as JSON here because coremltools' ModelPackage rewrites the manifest of every package it opens.
    """
    manifest_file = package / "Manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
        items = manifest["itemInfoEntries"]
        root = items.get(manifest["rootModelIdentifier"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{manifest_file}: not a valid package manifest ({exc!r}); export the package again") from exc
    if not isinstance(root, dict) or "path" not in root:
        raise ConversionError(f"{manifest_file}: names no root model spec (model.mlmodel); export the package again")
    spec_file = package_item(package, root["path"], manifest_file)
    if not spec_file.is_file():
        raise ConversionError(f"{manifest_file}: the model spec it names, {spec_file}, is missing; export the package again")
    return spec_file, weights_folder(package, items, manifest_file)


def weights_folder(package: Path, items: dict, manifest_file: Path) -> Path | None:
    for item in items.values():
        if isinstance(item, dict) and item.get("name") == "weights" and item.get("author") == MANIFEST_AUTHOR:
            return package_item(package, item["path"], manifest_file)
    return None


def package_item(package: Path, relative: str, manifest_file: Path) -> Path:
    """A manifest entry's path, which must stay inside the package's Data folder."""
    data = (package / "Data").resolve()
    path = (data / relative).resolve()
    if not path.is_relative_to(data):
        raise ConversionError(f"{manifest_file}: entry '{relative}' points outside the package; refusing to read it")
    return path


def parse_spec(spec_file: Path):
    from coremltools.models.utils import load_spec
    from google.protobuf.message import DecodeError

    try:
        return load_spec(str(spec_file))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ConversionError(f"{spec_file}: not a readable Core ML model spec ({exc}); export the package again") from exc


def main_operations(spec, path: Path) -> list:
    functions = spec.mlProgram.functions
    name = spec.description.defaultFunctionName or "main"
    if name not in functions:
        if len(functions) != 1:
            raise ConversionError(f"{path}: the ML Program has no '{name}' function (it has {sorted(functions)})")
        name = next(iter(functions))
    function = functions[name]
    return list(function.block_specializations[function.opset].operations)


def blob_file_of(program: Program, value_spec) -> Path | None:
    if value_spec.WhichOneof("value") != "blobFileValue" or program.weights_dir is None:
        return None
    return program.weights_dir / value_spec.blobFileValue.fileName.split("/")[-1]


def is_constant(op) -> bool:
    return op.type == "const" or op.type.startswith("constexpr_")


def data_type_name(code: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code)


def tensor_shape(value_type) -> tuple[int, ...]:
    return tuple(int(d.constant.size) for d in value_type.tensorType.dimensions)


# ---- damage found before writing anything ----


def check_blobs(program: Program) -> None:
    """Every constant stored in a blob file lies inside it (a cut-off weight.bin fails here)."""
    for op in program.operations:
        if is_constant(op):
            for value_spec in blob_values(op):
                check_blob(program, value_spec, op.outputs[0].name)


def blob_values(op) -> list:
    """The values an op keeps in a blob file: attributes (const, iOS16) and inline arguments (iOS18)."""
    specs = list(op.attributes.values())
    specs += [b.value for argument in op.inputs.values() for b in argument.arguments if b.WhichOneof("binding") == "value"]
    return [spec for spec in specs if spec.WhichOneof("value") == "blobFileValue"]


def check_blob(program: Program, value_spec, name: str) -> None:
    file = blob_file_of(program, value_spec)
    if file is None:
        raise ConversionError(no_weights_folder(program, name))
    if not file.is_file():
        raise ConversionError(f"{file}: missing, but '{name}' is stored in it; export the package again")
    size, end = file.stat().st_size, value_spec.blobFileValue.offset + value_bytes(value_spec.type)
    if end > size:
        raise ConversionError(f"{file}: truncated, '{name}' needs bytes up to {end} but the file has {size}; "
                              "export the package again")


def no_weights_folder(program: Program, name: str) -> str:
    if program.path.is_dir():
        return (f"{program.path / 'Manifest.json'}: lists no weights folder, but '{name}' is stored in one; "
                "export the package again")
    return (f"{program.path}: '{name}' is stored in a separate weights file, which a lone .mlmodel cannot carry; "
            "convert the .mlpackage it came from")


def value_bytes(value_type) -> int:
    """The bytes a stored tensor's data takes (its blob header not counted)."""
    bits = DATA_TYPE_BITS.get(data_type_name(value_type.tensorType.dataType), 0)
    return math.ceil(math.prod(tensor_shape(value_type)) * bits / 8)
