"""Where a Core ML program's weights come from and how it uses them: every float constant, followed
through cast and 2-D transpose ops to the ops that use it, with the role each use gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from converters.coreml_program import Program, data_type_name, is_constant, tensor_shape

FLOAT_TYPES = {"FLOAT16", "FLOAT32", "BFLOAT16"}
# Ops through which a weight passes unchanged on its way to the op that uses it.
ALIAS_OPS = {"cast", "transpose"}


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


def is_float_tensor(value_type) -> bool:
    if value_type.WhichOneof("type") != "tensorType":
        return False
    tensor = value_type.tensorType
    return tensor.rank >= 1 and data_type_name(tensor.dataType) in FLOAT_TYPES


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
