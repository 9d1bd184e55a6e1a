"""Core ML reader: the weights of an ML Program (`.mlpackage`, or an `.mlmodel` with inline weights)
as HF-named MLX tensors, read with coremltools on any platform (nothing is compiled or predicted).

Core ML keeps no parameter names, only MIL values. Each value the weights come from is matched to a
parameter of the transformers model the config describes: by name when the value's name carries the
parameter's path (what coremltools' torch frontend writes), otherwise by position (the order in which
the program first uses it against the order in which the model runs) and by how the program uses it
(linear/matmul weight, gather table, norm scale) with a fitting shape, never by shape alone.

Compressed weights: block-wise (`constexpr_blockwise_shift_scale`) and per-channel affine
(`constexpr_affine_dequantize`) int4/int8 whose blocks run along the input dimension in multiples of 32
become MLX affine 4/8-bit with the codes kept; everything else (palettes, sparse, odd blocks) is
dequantised with coremltools' own `decompress`.

config.json and the tokenizer files are read from the folder that holds the package.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from converters.hf import copier, read_config, tokenizer_files
from converters.source import SourceModel, quantization_block
from errors import ConversionError

log = logging.getLogger(__name__)
# coremltools warns at import that prediction is unavailable off macOS; we never predict.
logging.getLogger("coremltools").setLevel(logging.ERROR)

MANIFEST_AUTHOR = "com.apple.CoreML"
FLOAT_TYPES = {"FLOAT16", "FLOAT32", "BFLOAT16"}
# Ops through which a weight passes unchanged on its way to the op that uses it.
ALIAS_OPS = {"cast", "transpose"}
MLX_GROUP_SIZES = (128, 64, 32)
# Norms whose module computes `x * (offset + weight)`: a program that folded the sum holds the sum.
NORM_OFFSETS = {"gemma2": 1.0, "gemma3": 1.0, "gemma3_text": 1.0}
CODE_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8}
SIGNED_CODES = {"INT4", "INT8"}
DATA_TYPE_BITS = {"FLOAT32": 32, "FLOAT16": 16, "BFLOAT16": 16, "INT32": 32, "UINT32": 32, "INT16": 16, "UINT16": 16,
                  "INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4, "UINT6": 6, "UINT3": 3, "UINT2": 2, "UINT1": 1}


def read(path: Path) -> SourceModel:
    folder = path.parent
    config = read_config(folder, path)
    save_tokenizer = copier(tokenizer_files(folder, path))
    program = load_program(path)
    check_blobs(program)
    expected = expected_parameters(config, path)
    placements = match_parameters(expected, weight_sources(program), path)
    tensors = [planned_tensor(program, placement) for placement in placements]
    log_compression(path, tensors)
    return SourceModel(
        architecture=config["model_type"],
        config=config,
        parameters=sum(math.prod(p.expected.shape) for p in placements),
        tensors=lambda: (item for planned in tensors for item in planned.make()),
        save_tokenizer=save_tokenizer,
        quantization=layer_quantization(tensors),
        source=path,
    )


def log_compression(path: Path, tensors: list) -> None:
    compressed = [t for t in tensors if t.placement.source.op.type != "const"]
    kept = sum(t.layout is not None for t in compressed)
    if compressed:
        log.info("%s: %d compressed weights, %d kept as MLX affine codes, %d dequantised (no exact MLX form)",
                 path, len(compressed), kept, len(compressed) - kept)


# ---- the program: spec, operations and the weights folder ----


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


# ---- where weights come from and how the program uses them ----


@dataclass(frozen=True)
class Use:
    position: int  # index of the using op in the block
    rank: int  # which of that op's arguments: a weight comes before its bias
    role: str  # matrix, matrix_t (stored input-major), conv, embedding, scale, shift, bias, other


@dataclass
class WeightSource:
    name: str
    op: object  # the const or constexpr_* operation that produces it
    shape: tuple[int, ...]
    uses: list[Use] = field(default_factory=list)

    @property
    def roles(self) -> set[str]:
        return {use.role for use in self.uses}

    @property
    def order(self) -> tuple[int, int]:
        first = min(self.uses, key=lambda use: (use.position, use.rank))
        return first.position, first.rank


def weight_sources(program: Program) -> list[WeightSource]:
    """Every float tensor the program holds as a constant, with the ops that use it."""
    sources = {op.outputs[0].name: WeightSource(op.outputs[0].name, op, tensor_shape(op.outputs[0].type))
               for op in program.operations if is_constant(op) and is_float_tensor(op.outputs[0].type)}
    aliases = {name: (name, False) for name in sources}
    for position, op in enumerate(program.operations):
        if is_constant(op):
            continue
        if op.type in ALIAS_OPS and (alias := alias_of(op, aliases, program)):
            aliases[op.outputs[0].name] = alias
            continue
        record_uses(op, position, aliases, sources, program)
    return [source for source in sources.values() if source.uses]


def is_constant(op) -> bool:
    return op.type == "const" or op.type.startswith("constexpr_")


def is_float_tensor(value_type) -> bool:
    if value_type.WhichOneof("type") != "tensorType":
        return False
    tensor = value_type.tensorType
    return tensor.rank >= 1 and data_type_name(tensor.dataType) in FLOAT_TYPES


def data_type_name(code: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code)


def tensor_shape(value_type) -> tuple[int, ...]:
    return tuple(int(d.constant.size) for d in value_type.tensorType.dimensions)


def argument_names(op, key: str) -> list[str]:
    argument = op.inputs.get(key)
    return [b.name for b in argument.arguments if b.WhichOneof("binding") == "name"] if argument else []


def alias_of(op, aliases: dict, program: Program) -> tuple[str, bool] | None:
    """(source name, transposed) when `op` passes a weight on unchanged or 2-D transposed."""
    names = argument_names(op, "x")
    if not names or names[0] not in aliases:
        return None
    source, transposed = aliases[names[0]]
    if op.type == "transpose":
        perm = const_input(op, "perm", program)
        if perm is None or list(perm) != [1, 0]:
            return None
        transposed = not transposed
    return source, transposed


def const_input(op, key: str, program: Program):
    """The value of a small constant argument (axis, perm, transpose flags), or None."""
    argument = op.inputs.get(key)
    if not argument or len(argument.arguments) != 1:
        return None
    binding = argument.arguments[0]
    if binding.WhichOneof("binding") == "value":
        return program.read_value(binding.value, f"argument '{key}'")
    producer = program.producers.get(binding.name)
    if producer is None or producer.type != "const":
        return None
    return program.read_value(producer.attributes["val"], f"constant '{binding.name}'")


def record_uses(op, position: int, aliases: dict, sources: dict, program: Program) -> None:
    for rank, key in enumerate(op.inputs):
        for name in argument_names(op, key):
            if name in aliases:
                source, transposed = aliases[name]
                role = role_of(op, key, transposed, program)
                sources[source].uses.append(Use(position, argument_rank(key, rank), role))


def argument_rank(key: str, rank: int) -> int:
    return {"weight": 0, "gamma": 0, "bias": 1, "beta": 1}.get(key, 2 + rank)


def role_of(op, key: str, transposed: bool, program: Program) -> str:
    kind = op.type
    if kind == "linear":
        role = {"weight": "matrix", "bias": "bias"}.get(key, "other")
    elif kind == "matmul" and key == "y":
        role = "matrix" if truthy(const_input(op, "transpose_y", program)) else "matrix_t"
    elif kind == "conv" and key == "weight":
        role = "conv"
    elif kind == "gather" and key == "x" and not truthy(const_input(op, "axis", program)):
        role = "embedding"
    elif kind == "layer_norm":
        role = {"gamma": "scale", "beta": "bias"}.get(key, "other")
    else:
        role = {"mul": "scale", "add": "shift"}.get(kind, "other")
    return transposed_role(role) if transposed else role


def truthy(value) -> bool:
    return value is not None and bool(np.asarray(value).item())


def transposed_role(role: str) -> str:
    return {"matrix": "matrix_t", "matrix_t": "matrix"}.get(role, "other")


# ---- what the config's architecture expects, in the order it runs ----


@dataclass(frozen=True)
class Expected:
    name: str
    shape: tuple[int, ...]
    kind: str  # matrix, bias, embedding, scale
    offset: float = 0.0


def expected_parameters(config: dict, source: Path) -> list[Expected]:
    """The transformers model's parameters for this config (built on the meta device), in execution order."""
    import torch

    model = meta_model(config, source)
    offset = NORM_OFFSETS.get(config["model_type"], 0.0)
    modules = dict(model.named_modules())
    order = execution_order(model, config, source)
    expected = []
    for name, param in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        kind = parameter_kind(modules[module_name], leaf, torch)
        expected.append(Expected(name, tuple(param.shape), kind, offset if kind == "scale" else 0.0))
    rank = {name: index for index, name in enumerate(order)}
    return sorted(expected, key=lambda e: rank.get(e.name.rpartition(".")[0], len(rank)))


def meta_model(config: dict, source: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), attn_implementation="eager")
    except (ValueError, TypeError, KeyError) as exc:
        raise ConversionError(f"{source}: transformers cannot build a {config.get('model_type')} model from its config ({exc})") from exc


def parameter_kind(module, leaf: str, torch) -> str:
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "matrix" if leaf == "weight" else "bias"
    return "scale" if leaf == "weight" else "bias"


def execution_order(model, config: dict, source: Path) -> list[str]:
    """Names of the modules owning parameters, in the order a forward pass on the meta device calls them."""
    import torch

    order: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
             for name, module in model.named_modules() if next(module.parameters(recurse=False), None) is not None]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device="meta"), attention_mask=meta_masks(model.config),
                  use_cache=False)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        log.warning("%s: could not trace the %s forward order (%s); using definition order", source, config["model_type"], exc)
        return [name for name, _ in model.named_modules()]
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(order))


def meta_masks(config):
    """Ready 4-D masks, so that transformers builds none (its mask code reads values, which meta tensors lack)."""
    import torch

    mask = torch.zeros((1, 1, 2, 2), device="meta")
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return {"full_attention": mask, "sliding_attention": mask}
    return mask


# ---- matching sources to parameters ----


@dataclass(frozen=True)
class Placement:
    expected: Expected
    source: WeightSource
    transpose: bool = False
    offset: float = 0.0  # the source holds offset + weight


def match_parameters(expected: list[Expected], sources: list[WeightSource], path: Path) -> list[Placement]:
    by_name = match_by_name(expected, sources, path)
    by_position = match_by_position(expected, sources, by_name, path)
    log.info("%s: %d weights matched by name, %d by position and use", path, len(by_name), len(by_position))
    placed = {**by_name, **by_position}
    warn_unclaimed_matrices(sources, placed.values(), path)
    return [placed[e.name] for e in expected]


def warn_unclaimed_matrices(sources: list[WeightSource], placed, path: Path) -> None:
    claimed = {id(p.source) for p in placed}
    unclaimed = [s for s in sources if id(s) not in claimed and s.roles & {"matrix", "matrix_t", "conv"}]
    if unclaimed:
        log.warning("%s: %d weight matrices the program multiplies by fit no parameter of config.json and are left out "
                    "(first: '%s' %s)", path, len(unclaimed), unclaimed[0].name, unclaimed[0].shape)


def normalised(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def match_by_name(expected: list[Expected], sources: list[WeightSource], path: Path) -> dict[str, Placement]:
    keys = {normalised(e.name): e for e in expected}
    claims: dict[str, list[WeightSource]] = {}
    for source in sources:
        key = claimed_key(normalised(source.name), keys)
        if key:
            claims.setdefault(keys[key].name, []).append(source)
    by_name = {e.name: e for e in expected}
    return {name: only_fitting(by_name[name], found, path) for name, found in claims.items()}


def claimed_key(source_name: str, keys: dict) -> str | None:
    """The longest parameter key found in the source's name as whole `_`-separated words."""
    found = [key for key in keys if key in source_name and re.search(rf"(^|_){re.escape(key)}(_|$)", source_name)]
    return max(found, key=len, default=None)


def only_fitting(expected: Expected, found: list[WeightSource], path: Path) -> Placement:
    placements = [p for p in (fit(expected, source) for source in found) if p]
    if len(placements) == 1:
        return placements[0]
    described = ", ".join(f"'{s.name}' {s.shape} used as {'/'.join(sorted(s.roles))}" for s in found)
    if placements:
        raise ConversionError(f"{path}: several weights are named for '{expected.name}' and fit it ({described}); "
                              "cannot tell which the model uses")
    raise ConversionError(f"{path}: config.json expects '{expected.name}' as {expected.kind} {expected.shape}, but the "
                          f"program holds {described}; the package and its config.json do not describe the same model")


def match_by_position(expected: list[Expected], sources: list[WeightSource], by_name: dict, path: Path) -> dict[str, Placement]:
    """Parameters not found by name: the next unclaimed source, in program order between the anchors
    found by name, that the program uses the way the parameter is used and whose shape fits."""
    claimed = {id(p.source) for p in by_name.values()}
    free = sorted((s for s in sources if id(s) not in claimed), key=lambda s: s.order)
    placed: dict[str, Placement] = {}
    cursor = (-1, -1)
    for index, param in enumerate(expected):
        if param.name in by_name:
            cursor = by_name[param.name].source.order
            continue
        limit = next_anchor(expected[index + 1:], by_name)
        placement = first_fit(param, free, cursor, limit)
        if placement is None:
            raise ConversionError(f"{path}: no weight in the program fits '{param.name}' ({param.kind} {param.shape}) "
                                  "that config.json expects; the package and its config.json do not describe the same model")
        placed[param.name] = placement
        free.remove(placement.source)
        cursor = placement.source.order
    return placed


def next_anchor(rest: list[Expected], by_name: dict) -> tuple[int, int]:
    return next((by_name[e.name].source.order for e in rest if e.name in by_name), (math.inf, math.inf))


def first_fit(param: Expected, free: list[WeightSource], cursor: tuple, limit: tuple) -> Placement | None:
    for source in free:
        if cursor < source.order < limit and (placement := fit(param, source)):
            return placement
    return None


def fit(param: Expected, source: WeightSource) -> Placement | None:
    """How `source` holds `param`, if the program uses it the way the model uses that parameter."""
    roles, shape = source.roles, source.shape
    if param.kind == "matrix":
        if roles & {"matrix", "conv"} and squeezed(shape) == squeezed(param.shape):
            return Placement(param, source)
        if "matrix_t" in roles and shape == param.shape[::-1]:
            return Placement(param, source, transpose=True)
    elif param.kind == "embedding":
        if "embedding" in roles and shape == param.shape:
            return Placement(param, source)
    elif squeezed(shape) == squeezed(param.shape):
        return fit_vector(param, source, roles)
    return None


def fit_vector(param: Expected, source: WeightSource, roles: set[str]) -> Placement | None:
    if param.kind == "bias" and roles & {"bias", "shift"}:
        return Placement(param, source)
    if param.kind == "scale" and "shift" in roles:
        return Placement(param, source)  # the program still adds the offset itself
    if param.kind == "scale" and "scale" in roles:
        return Placement(param, source, offset=param.offset)
    return None


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without the size-1 axes a program adds to broadcast a vector or to feed a 1x1 conv."""
    kept = tuple(d for d in shape if d != 1)
    return kept or (1,)


# ---- tensors: dense, or MLX affine with the codes kept ----


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
