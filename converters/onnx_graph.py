"""The ONNX graph: who uses each initializer, in which scope and role.

An initializer is named by the node that consumes it: the node's name scope (the TorchScript
exporter's `/model/layers.0/self_attn/q_proj/MatMul`, the dynamo exporter's `name_scopes`) gives the
module, and the op and input slot give the role and layout: MatMul holds (in, out), so it is
transposed back to HF's (out, in); Gather holds an embedding; Mul or a normalisation op holds a norm
scale. Shapes are checked, never used to identify a tensor: square matrices would collide. Constant
folding renames initializers (`onnx::MatMul_123`) and bakes Gemma's `1 + w` into the norm scale, so
names are only a fallback and Gemma scales get the 1 taken back off.
"""

from __future__ import annotations

import ast
import logging
from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import helper

from converters.onnx_initializers import Initializers

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
# Scope spellings of other exporters (onnxruntime-genai's model builder writes `attn`).
SCOPE_ALIASES = {"attn": "self_attn"}
TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


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
