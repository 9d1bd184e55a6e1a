"""ONNX reader: the initializers of an exported decoder graph, back into HF-named MLX tensors.

An initializer is named by the node that consumes it: the node's name scope (the TorchScript
exporter's `/model/layers.0/self_attn/q_proj/MatMul`, the dynamo exporter's `name_scopes`) gives the
module, and the op and input slot give the role and layout: MatMul holds (in, out), so it is
transposed back to HF's (out, in); Gather holds an embedding; Mul or a normalisation op holds a norm
scale. Shapes are checked, never used to identify a tensor: square matrices would collide. Constant
folding renames initializers (`onnx::MatMul_123`) and bakes Gemma's `1 + w` into the norm scale, so
names are only a fallback and Gemma scales get the 1 taken back off.

The expected parameters are those of the mlx-lm module that will load the checkpoint; each one must
be found exactly once. Fused qkv / gate_up projections are split or joined to match that module.

External data is memory-mapped in place, and only from inside the model's folder. `MatMulNBits`
(com.microsoft) weights with 4 or 8 bits and block size 32, 64 or 128 are repacked into MLX's affine
layout without dequantising (ONNX Runtime packs codes low nibble first, as MLX does); other block sizes
are dequantised.
"""

from __future__ import annotations

import ast
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from converters.hf import hf_source, read_config, sidecar_folder
from converters.source import SourceModel, quantization_block
from converters.validate import expected_shapes
from errors import ConversionError

log = logging.getLogger(__name__)

# Ops an initializer may pass through on its way to the node that uses it (Transpose flips the layout).
PASS_THROUGH = {"Identity", "Cast", "Transpose"}
# Input slots of normalisation ops that hold the scale (gamma) and the bias (beta).
NORM_SLOTS = {
    "SimplifiedLayerNormalization": (1, None),
    "RMSNormalization": (1, None),
    "LayerNormalization": (1, 2),
    "SkipSimplifiedLayerNormalization": (2, None),
    "SkipLayerNormalization": (2, 3),
}
# Gemma's norms compute x * (1 + w) and store w; mlx-lm's gemma modules add the 1 themselves.
ONE_PLUS_NORMS = {"gemma", "gemma2", "gemma3", "gemma3_text"}
# Scope spellings of other exporters (onnxruntime-genai's model builder writes `attn`).
SCOPE_ALIASES = {"attn": "self_attn"}
# Packed 4-bit ONNX element types: two values per byte.
PACKED_NIBBLE_TYPES = {TensorProto.INT4, TensorProto.UINT4}
MLX_GROUP_SIZES = {32, 64, 128}
MLX_NATIVE_BITS = {4, 8}
TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


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


# ---- initializer data, read in place ----

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


# ---- what mlx-lm will load ----

def expected_parameters(config: dict, source: Path) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every parameter of the mlx-lm module for `config` (built lazily: nothing is allocated)."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        shapes = expected_shapes(model_class(args_class.from_dict(config)))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConversionError(f"{source}: config.json does not describe a complete {config['model_type']} model ({exc})") from exc
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def fusions(config: dict) -> dict[str, list[tuple[str, int]]]:
    """Fused projection -> its parts and their output rows, as HF's phi3 (and ONNX builders) fuse them."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_rows = config.get("num_key_value_heads", heads) * head_dim
    mlp_rows = config["intermediate_size"]
    return {
        "self_attn.qkv_proj": [("self_attn.q_proj", heads * head_dim), ("self_attn.k_proj", kv_rows), ("self_attn.v_proj", kv_rows)],
        "mlp.gate_up_proj": [("mlp.gate_proj", mlp_rows), ("mlp.up_proj", mlp_rows)],
    }


@dataclass(frozen=True)
class Assembly:
    """An expected tensor the graph may hold grouped otherwise than mlx-lm's module does."""
    kind: str  # "split": one fused tensor is cut into expected parts; "join": parts are joined into an expected tensor
    name: str  # the fused tensor
    parts: tuple[tuple[str, int], ...]  # (part name, rows), in fused order


def alternatives(expected: dict[str, tuple], config: dict) -> dict[str, tuple[tuple[int, ...], Assembly]]:
    """Tensors that are not expected as such but may stand in for expected ones: name -> (shape, assembly)."""
    found = {}
    for fused, parts in fusions(config).items():
        found.update(fused_stand_ins(expected, fused, parts))
        found.update(part_stand_ins(expected, fused, parts))
    return found


def fused_stand_ins(expected: dict, fused: str, parts: list) -> dict:
    """`a.qkv_proj.weight` standing in for the expected `a.q_proj.weight`, `a.k_proj.weight`, `a.v_proj.weight`."""
    found = {}
    for name in expected:
        prefix, suffix = split_around(name, parts[0][0])
        part_names = tuple((f"{prefix}{part}{suffix}", rows) for part, rows in parts)
        if prefix is not None and all(part in expected for part, _ in part_names):
            fused_name = f"{prefix}{fused}{suffix}"
            found[fused_name] = (joined_shape(expected, part_names), Assembly("split", fused_name, part_names))
    return found


def part_stand_ins(expected: dict, fused: str, parts: list) -> dict:
    """`a.gate_proj.weight` and `a.up_proj.weight` standing in for the expected `a.gate_up_proj.weight`."""
    found = {}
    for name, shape in expected.items():
        prefix, suffix = split_around(name, fused)
        if prefix is not None:
            part_names = tuple((f"{prefix}{part}{suffix}", rows) for part, rows in parts)
            assembly = Assembly("join", name, part_names)
            found.update({part: ((rows, *shape[1:]), assembly) for part, rows in part_names})
    return found


def split_around(name: str, module: str) -> tuple[str | None, str]:
    """(`a.b.`, `.weight`) if `name` is `a.b.<module>.weight`, else (None, '')."""
    marker = f".{module}."
    if marker not in name:
        return None, ""
    prefix, suffix = name.split(marker, 1)
    return f"{prefix}.", f".{suffix}"


def joined_shape(expected: dict, parts: tuple) -> tuple[int, ...]:
    shapes = [expected[name] for name, _ in parts]
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


# ---- graph: who uses each initializer, in which scope and role ----

@dataclass(frozen=True, eq=False)
class Use:
    node: onnx.NodeProto
    slot: int
    transposed: bool  # reached through a Transpose


def initializer_uses(graph: onnx.GraphProto, data: Initializers) -> dict[str, list[Use]]:
    consumers = defaultdict(list)
    for node in graph.node:
        for slot, value in enumerate(node.input):
            if value:
                consumers[value].append((node, slot))
    return {name: list(walk_uses(name, consumers, False)) for name in data.protos}


def walk_uses(value: str, consumers: dict, transposed: bool):
    for node, slot in consumers.get(value, ()):
        if node.op_type in PASS_THROUGH and slot == 0:
            yield from walk_uses(node.output[0], consumers, transposed ^ (node.op_type == "Transpose"))
        else:
            yield Use(node, slot, transposed)


def scope_paths(node: onnx.NodeProto) -> list[str]:
    """Dotted module paths a node belongs to, most specific first."""
    paths = []
    if "/" in node.name:
        paths.append(".".join(part for part in node.name.split("/")[:-1] if part))
    elif "." in node.name:
        paths.append(node.name.rsplit(".", 1)[0])
    for prop in node.metadata_props:
        if prop.key == TORCH_NAME_SCOPES:
            paths.extend(reversed(parse_scopes(prop.value)))
    return paths


def parse_scopes(text: str) -> list[str]:
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        log.debug("unreadable name scopes %r", text)
        return []
    return [scope for scope in scopes if isinstance(scope, str)]


def match_module(path: str, modules: set[str]) -> str | None:
    """The longest tail of `path` (wrapper prefixes dropped) that names a known module."""
    parts = path.split(".")
    for start in range(len(parts)):
        tail = parts[start:]
        for spelling in (tail, [SCOPE_ALIASES.get(part, part) for part in tail]):
            if (candidate := ".".join(spelling)) in modules:
                return candidate
    return None


def module_of(use: Use, initializer: str, modules: set[str]) -> str | None:
    """By the consuming node's scope; by the initializer's own name only when that scope names no known module."""
    for path in [*scope_paths(use.node), initializer.rsplit(".", 1)[0]]:
        if module := match_module(path, modules):
            return module
    return None


def role(use: Use) -> str | None:
    """What the initializer is to its node: 'matrix' (stored (out, in) as HF does), 'matrix_t' (stored
    (in, out)), 'scale' (a norm scale), 'bias', 'add' (a bias, or Gemma's raw w in `1 + w`), 'nbits'."""
    op, slot = use.node.op_type, use.slot
    if op == "Gather" and slot == 0:
        return flip("matrix", use.transposed)
    if op == "MatMul" and slot == 1:
        return flip("matrix_t", use.transposed)
    if op == "Gemm" and slot == 1:
        return flip("matrix" if attribute(use.node, "transB", 0) else "matrix_t", use.transposed)
    if op == "Gemm" and slot == 2:
        return "bias"
    if op == "MatMulNBits":
        return {1: "nbits", 5: "bias"}.get(slot)
    if op in NORM_SLOTS:
        return {NORM_SLOTS[op][0]: "scale", NORM_SLOTS[op][1]: "bias"}.get(slot)
    return {"Mul": "scale", "Add": "add"}.get(op)


def flip(kind: str, transposed: bool) -> str:
    return {"matrix": "matrix_t", "matrix_t": "matrix"}[kind] if transposed else kind


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


# ---- plan: one way to produce each expected tensor ----

@dataclass
class Piece:
    """How to produce one HF parameter; `load` returns (name, array) pairs (weight, scales, biases if quantised)."""
    name: str
    source: str  # what it is read from (initializer and layout), so two uses of one tensor count once
    origin: str  # the same, for people
    shape: tuple[int, ...]
    load: Callable[[], list[tuple[str, mx.array]]]
    quantized: tuple[int, int] | None = None  # (group size, bits)


@dataclass
class Findings:
    pieces: dict[str, list[Piece]]
    rejected: dict[str, list[str]]  # parameter -> why a candidate did not fit


def build_plan(graph, data: Initializers, expected: dict, config: dict, model_file: Path) -> list[Piece]:
    options = alternatives(expected, config)
    wanted = {**expected, **{name: shape for name, (shape, _) in options.items()}}
    findings = find_pieces(graph, data, wanted, config["model_type"] in ONE_PLUS_NORMS)
    found = {name: single(pieces, model_file) for name, pieces in findings.pieces.items()}
    plan = [resolve(name, found, options, findings, model_file) for name in expected]
    log.info("%s: %d of %d initializers map onto the %s model", model_file.name, len({p.source for p in found.values()}),
             len(data.protos), config["model_type"])
    return plan


def find_pieces(graph, data: Initializers, wanted: dict, one_plus: bool) -> Findings:
    findings = Findings(defaultdict(list), defaultdict(list))
    modules = {name.rsplit(".", 1)[0] for name in wanted}
    for initializer, uses in initializer_uses(graph, data).items():
        for use in uses:
            module = module_of(use, initializer, modules)
            if module is None:
                continue
            kind = role(use)
            if target := parameter_for(module, kind, wanted, one_plus):
                add_piece(findings, make_piece(target, initializer, use, data), wanted[target[0]])
            elif kind is None:
                note = f"node '{use.node.name}' uses initializer '{initializer}' through op {use.node.op_type}, which is not supported"
                findings.rejected[f"{module}.weight"].append(note)
    return findings


LAYOUTS = {"matrix": "as_is", "matrix_t": "transposed", "nbits": "nbits"}


def parameter_for(module: str, kind: str | None, wanted: dict, one_plus: bool) -> tuple[str, str] | None:
    """(parameter, layout) for an initializer of role `kind` in `module`, or None if the module has no such tensor."""
    weight, bias = f"{module}.weight", f"{module}.bias"
    rank = len(wanted.get(weight, ()))
    if kind in LAYOUTS and rank == 2:
        return weight, LAYOUTS[kind]
    if kind == "scale" and rank == 1:
        return weight, "one_plus" if one_plus else "as_is"
    if kind in ("bias", "add") and bias in wanted:
        return bias, "as_is"
    if kind == "add" and one_plus and rank == 1:
        return weight, "as_is"
    return None


def add_piece(findings: Findings, piece: Piece, shape: tuple) -> None:
    if piece.shape != shape:
        findings.rejected[piece.name].append(f"{piece.origin} has shape {piece.shape}, expected {shape}")
    elif all(p.source != piece.source for p in findings.pieces[piece.name]):
        findings.pieces[piece.name].append(piece)


def make_piece(target: tuple[str, str], initializer: str, use: Use, data: Initializers) -> Piece:
    name, layout = target
    if layout == "nbits":
        return nbits_piece(name, use.node, data)
    shape = data.shape(initializer)
    shape = tuple(reversed(shape)) if layout == "transposed" else shape
    origin = f"initializer '{initializer}' (node '{use.node.name or use.node.op_type}')"
    return Piece(name, f"{initializer}:{layout}", origin, shape, lambda: [(name, float_array(data.array(initializer), layout))])


def float_array(values: np.ndarray, layout: str) -> mx.array:
    array = mx.array(np.asarray(values))
    if layout == "transposed":
        array = array.T
    if layout == "one_plus":
        # The exporter folded Gemma's `1 + w` into this scale; mlx-lm stores w.
        array = (array.astype(mx.float32) - 1.0).astype(array.dtype)
    return array


def single(pieces: list[Piece], model_file: Path) -> Piece:
    if len(pieces) > 1:
        origins = " and ".join(p.origin for p in pieces[:2])
        raise ConversionError(f"{model_file}: parameter '{pieces[0].name}' found twice, in {origins}; the graph is ambiguous")
    return pieces[0]


def resolve(name: str, found: dict[str, Piece], options: dict, findings: Findings, model_file: Path) -> Piece:
    """The piece for an expected parameter: found as such, cut from a fused tensor, or joined from parts."""
    ways = [found[name]] if name in found else []
    ways += [split_piece(name, found[fused], assembly) for fused, (_, assembly) in options.items()
             if assembly.kind == "split" and fused in found and name in dict(assembly.parts)]
    join = next((a for _, a in options.values() if a.kind == "join" and a.name == name), None)
    if join and all(part in found for part, _ in join.parts):
        ways.append(joined_piece(name, [found[part] for part, _ in join.parts]))
    if not ways:
        raise missing(name, findings, model_file)
    return single(ways, model_file)


def missing(name: str, findings: Findings, model_file: Path) -> ConversionError:
    why = "; ".join(findings.rejected.get(name, [])[:2])
    detail = f" ({why})" if why else f" (no initializer is used by a node in scope '{name.rsplit('.', 1)[0]}')"
    return ConversionError(f"{model_file}: parameter '{name}' not found in the ONNX graph{detail}; "
                           f"the export is incomplete, does not match config.json, or is not supported yet")


def split_piece(name: str, fused: Piece, assembly: Assembly) -> Piece:
    start = 0
    for part, rows in assembly.parts:
        if part == name:
            break
        start += rows
    rows, module = dict(assembly.parts)[name], name.rsplit(".", 1)[0]

    def load():
        return [(f"{module}.{suffix}", array[start : start + rows]) for suffix, array in by_suffix(fused.load()).items()]

    origin = f"rows {start}:{start + rows} of {fused.origin}"
    return Piece(name, f"{fused.source}[{start}:{start + rows}]", origin, (rows, *fused.shape[1:]), load, fused.quantized)


def joined_piece(name: str, parts: list[Piece]) -> Piece:
    module = name.rsplit(".", 1)[0]

    def load():
        loaded = [by_suffix(part.load()) for part in parts]
        return [(f"{module}.{suffix}", mx.concatenate([arrays[suffix] for arrays in loaded])) for suffix in loaded[0]]

    if len({p.quantized for p in parts}) > 1:
        raise ConversionError(f"the parts of '{name}' are quantised differently, so they cannot be joined into one tensor")
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return Piece(name, "+".join(p.source for p in parts), " + ".join(p.origin for p in parts), shape, load, parts[0].quantized)


def by_suffix(tensors: list[tuple[str, mx.array]]) -> dict[str, mx.array]:
    """`a.b.scales` -> `scales`: the parts of one module's tensors."""
    return {name.rsplit(".", 1)[1]: array for name, array in tensors}


# ---- MatMulNBits (com.microsoft) ----

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


def nbits_piece(name: str, node: onnx.NodeProto, data: Initializers) -> Piece:
    spec = nbits_of(node)
    if spec.input(4):
        raise ConversionError(f"{data.model_file}: MatMulNBits node '{node.name}' uses g_idx (act-order), which is not supported yet")
    check_nbits(spec, data)
    module = name.rsplit(".", 1)[0]
    loader = (lambda: native_nbits(module, spec, data)) if spec.native else (lambda: [(name, dequantized_nbits(spec, data))])
    quantized = (spec.block_size, spec.bits) if spec.native else None
    return Piece(name, f"{spec.input(1)}:nbits", f"MatMulNBits node '{node.name}'", (spec.n, spec.k), loader, quantized)


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
