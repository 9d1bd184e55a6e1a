"""The check every checkpoint passes before the cache takes it: every parameter of the mlx-lm model
its config names is present exactly once, with the right shape, and nothing else is.

mlx-lm's own `load_model` builds the model (model class, `sanitize`, quantised layers and all) on lazy
arrays; only its last step, `load_weights`, is replaced by a comparison that names the first problem.
So what passes here is what `mlx_lm.load` accepts, and no weight is read to find out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from converters.source import Tensors
from errors import ConversionError

# What mlx-lm raises when a config does not fit its model classes.
CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, FileNotFoundError)


def distinct(tensors: Tensors, label: str) -> Iterator:
    """Pass (name, array) pairs through, failing on the first name seen twice."""
    seen: set[str] = set()
    for name, array in tensors:
        refuse_repeat(name, seen, label)
        yield name, array


def check_distinct(names: Iterable[str], label: str) -> None:
    seen: set[str] = set()
    for name in names:
        refuse_repeat(name, seen, label)


def refuse_repeat(name: str, seen: set[str], label: str) -> None:
    if name in seen:
        raise ConversionError(f"{label}: tensor '{name}' appears more than once")
    seen.add(name)


def validate_checkpoint(folder: Path, label: str) -> None:
    """Raise ConversionError naming `label` and the first missing, unexpected or mis-shaped tensor."""
    from mlx_lm.utils import load_model

    try:
        load_model(folder, lazy=True, get_model_classes=lambda config: checking_classes(config, label))
    except CONFIG_ERRORS as exc:
        raise ConversionError(f"{label}: mlx-lm cannot build its model from the converted config and tensors ({exc})") from exc


def checking_classes(config: dict, label: str):
    """mlx-lm's (model class, args class) for `config`, the model class comparing instead of loading."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model_type = config["model_type"]

    class CheckedModel(model_class):
        def load_weights(self, weights, strict: bool = True):
            compare_parameters(expected_shapes(self), dict(weights), f"{label}: mlx-lm's {model_type} model")
            return self

    return CheckedModel, args_class


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    from mlx.utils import tree_flatten

    return {name: tuple(array.shape) for name, array in tree_flatten(model.parameters())}


def compare_parameters(expected: dict[str, tuple], given: dict, context: str) -> None:
    unexpected = [name for name in given if name not in expected]
    if unexpected:
        raise ConversionError(f"{context} has no parameter '{unexpected[0]}' ({len(unexpected)} unexpected tensors)")
    missing = [name for name in expected if name not in given]
    if missing:
        raise ConversionError(f"{context} needs tensor '{missing[0]}', which is missing ({len(missing)} missing)")
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ConversionError(f"{context} expects '{name}' with shape {shape}, found {tuple(given[name].shape)}")
