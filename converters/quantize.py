"""Apply a conversion plan to tensors as they stream to the writer, with MLX's own kernels.

Float weights of the layers mlx-lm quantises (those with `to_quantized`) go through `mx.quantize` at
the width the plan gives their module; already-quantised layers pass through unchanged unless the plan
asks for fewer bits, in which case they are dequantised and quantised again. Each result is evaluated
at once, so the source tensor it came from can be freed before the next one is read.
"""

from __future__ import annotations

import mlx.core as mx

from converters.planner import Plan
from converters.source import SourceModel, quantization_block
from errors import ConversionError

PACKED_PARTS = ("weight", "scales", "biases")


def quantizable_modules(config: dict) -> set[str]:
    """Paths of the modules mlx-lm would quantise in the model this config builds (no weights read)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    predicate = getattr(model, "quant_predicate", None)
    return {
        path for path, module in model.named_modules()
        if hasattr(module, "to_quantized") and (predicate is None or predicate(path, module))
    }


class PlannedWeights:
    """`apply(tensors)` yields the planned tensors; `block()` is then the config's quantisation block."""

    def __init__(self, model: SourceModel, plan: Plan):
        self.plan = plan
        self.label = model.label
        self.source_block = model.quantization or {}
        self.quantizable = quantizable_modules(model.config) if plan.quantizes else set()
        self.dtype = getattr(mx, plan.layout.dtype) if plan.layout.dtype else None
        self.written: dict[str, dict] = {}  # module -> the quantisation it was written with
        self.pending: dict[str, dict] = {}  # parts of a quantised layer still waiting for the others

    def apply(self, tensors):
        for name, array in tensors:
            yield from self.convert(name, array)
        if self.pending:
            module = next(iter(self.pending))
            raise ConversionError(f"{self.label}: quantised layer '{module}' lacks its {'/'.join(PACKED_PARTS)} tensors")

    def convert(self, name: str, array):
        module, _, part = name.rpartition(".")
        if part in ("scales", "biases") or (part == "weight" and array.dtype == mx.uint32):
            yield from self.quantised_part(module, part, array)
        elif part == "weight" and self.should_quantize(module, array):
            yield from self.quantized(module, array)
        else:
            yield name, self.cast(array)

    def should_quantize(self, module: str, array) -> bool:
        fits_groups = array.ndim == 2 and array.shape[-1] % self.plan.layout.group_size == 0
        return module in self.quantizable and mx.issubdtype(array.dtype, mx.floating) and fits_groups

    def cast(self, array):
        if self.dtype is None or not mx.issubdtype(array.dtype, mx.floating) or array.dtype == self.dtype:
            return array
        cast = array.astype(self.dtype)
        mx.eval(cast)
        return cast

    def quantized(self, module: str, weights):
        bits, group_size = self.plan.bits_for(module), self.plan.layout.group_size
        packed, scales, biases = mx.quantize(self.cast(weights), group_size=group_size, bits=bits)
        mx.eval(packed, scales, biases)
        self.written[module] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        yield from ((f"{module}.weight", packed), (f"{module}.scales", scales), (f"{module}.biases", biases))

    def quantised_part(self, module: str, part: str, array):
        setting = self.source_setting(module)
        if not self.narrows(module, setting):
            self.written[module] = setting
            yield f"{module}.{part}", array
            return
        parts = self.pending.setdefault(module, {})
        parts[part] = array
        if set(PACKED_PARTS) <= parts.keys():
            del self.pending[module]
            weights = mx.dequantize(parts["weight"], parts["scales"], parts["biases"],
                                    group_size=setting["group_size"], bits=setting["bits"])
            yield from self.quantized(module, weights)

    def narrows(self, module: str, setting: dict) -> bool:
        """Whether the plan stores this already-quantised layer with fewer bits than the source."""
        if not self.plan.quantizes or module not in self.quantizable or setting["bits"] <= self.plan.bits_for(module):
            return False
        if setting["mode"] != "affine":
            raise ConversionError(f"{self.label}: layer '{module}' is {setting['mode']}-quantised, which Impetus cannot "
                                  f"requantise to {self.plan.bits_for(module)} bits; convert a float or affine source instead")
        return True

    def source_setting(self, module: str) -> dict:
        override = self.source_block.get(module)
        chosen = override if isinstance(override, dict) else self.source_block
        if "bits" not in chosen:
            raise ConversionError(f"{self.label}: layer '{module}' is quantised but its config has no quantization block")
        return {"group_size": chosen["group_size"], "bits": chosen["bits"], "mode": chosen.get("mode", "affine")}

    def block(self) -> dict | None:
        """The config's `quantization`: the common setting, and an override for every other layer."""
        planned = {"group_size": self.plan.layout.group_size, "bits": self.plan.layout.bits, "mode": "affine"}
        return quantization_block(self.written, planned if self.plan.quantizes else None)
