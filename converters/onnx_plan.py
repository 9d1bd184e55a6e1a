"""The ONNX plan: one way to produce each parameter mlx-lm expects, from the graph's initializers.

The expected parameters are those of the mlx-lm module that will load the checkpoint; each one must
be found exactly once. Fused qkv / gate_up projections are split or joined to match that module.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import onnx

from converters.onnx_graph import Use, initializer_uses, module_of, role
from converters.onnx_initializers import Initializers
from converters.onnx_nbits import check_nbits, dequantized_nbits, native_nbits, nbits_of
from converters.validate import expected_shapes
from errors import ConversionError

log = logging.getLogger(__name__)

# Gemma's norms compute x * (1 + w) and store w; mlx-lm's gemma modules add the 1 themselves.
ONE_PLUS_NORMS = {"gemma", "gemma2", "gemma3", "gemma3_text"}


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


# ---- MatMulNBits nodes (decoded in onnx_nbits) ----

def nbits_piece(name: str, node: onnx.NodeProto, data: Initializers) -> Piece:
    spec = nbits_of(node)
    if spec.input(4):
        raise ConversionError(f"{data.model_file}: MatMulNBits node '{node.name}' uses g_idx (act-order), which is not supported yet")
    check_nbits(spec, data)
    module = name.rsplit(".", 1)[0]
    loader = (lambda: native_nbits(module, spec, data)) if spec.native else (lambda: [(name, dequantized_nbits(spec, data))])
    quantized = (spec.block_size, spec.bits) if spec.native else None
    return Piece(name, f"{spec.input(1)}:nbits", f"MatMulNBits node '{node.name}'", (spec.n, spec.k), loader, quantized)
