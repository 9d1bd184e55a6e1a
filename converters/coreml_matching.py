"""Matching a Core ML program's weights to the parameters of the transformers model the config describes.

Core ML keeps no parameter names, only MIL values. Each value the weights come from is matched to a
parameter of the transformers model the config describes: by name when the value's name carries the
parameter's path (what coremltools' torch frontend writes), otherwise by position (the order in which
the program first uses it against the order in which the model runs) and by how the program uses it
(linear/matmul weight, gather table, norm scale) with a fitting shape, never by shape alone.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from converters.coreml_graph import WeightSource
from errors import ConversionError

log = logging.getLogger(__name__)
# Norms whose module computes `x * (offset + weight)`: a program that folded the sum holds the sum.
NORM_OFFSETS = {"gemma2": 1.0, "gemma3": 1.0, "gemma3_text": 1.0}


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
