"""How a model is stored so that it fits the machine: the best quality whose weights, KV cache for the
target context and runtime overhead fit the memory budget.

Quality ladder, best first: the source as it is, 16-bit floats, then MLX affine quantisation at 8, 6,
5, 4 and 3 bits, with a mixed variant at 4 and 3 bits that keeps the output head and the `v_proj` /
`down_proj` of some layers at a higher width (the layer choice of llama.cpp's Q4_K_M, which mlx-lm's
mixed recipes also use). Nothing above the source's own precision is offered, and only widths MLX
implements. Pure computation (standard library only), so it is cheap and testable for any machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from errors import ConversionError

GB = 10**9
# Widths MLX's affine quantisation implements (no 7).
MLX_WIDTHS = (2, 3, 4, 5, 6, 8)
LADDER_WIDTHS = (8, 6, 5, 4, 3)
MIXED_WIDTHS = (4, 3)
MIXED_HIGH_BITS = 6
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
FLOAT_DTYPES = {"float32": 32, "float16": 16, "bfloat16": 16}
# What a float source is reduced to: bf16 keeps fp32's range, so no activation overflows.
DEFAULT_HALF_DTYPE = "bfloat16"
# Each group stores an fp16 scale and an fp16 bias.
GROUP_OVERHEAD_BITS = 32
KV_BYTES_PER_VALUE = 2  # the KV cache is kept in fp16
DEFAULT_MEMORY_SHARE = 0.75
# Enough for agents like Cline; longer contexts are asked for with `--context`.
DEFAULT_CONTEXT_TARGET = 32768
FALLBACK_CONTEXT = 4096
# When nothing fits with the target context's KV cache, the planner settles for this much context.
MINIMUM_CONTEXT = 4096
# Below this width quality drops fast: a shorter context is preferred to fewer bits.
FLOOR_BITS = 4
# Activations, logits and MLX's buffers: a fixed floor plus a share of the weights.
OVERHEAD_FIXED_BYTES = 512 << 20
OVERHEAD_WEIGHT_SHARE = 0.05


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs to know of a model; read from its HF-style config."""

    parameters: int
    layers: int
    hidden_size: int
    intermediate_size: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool = False
    context_length: int | None = None

    @classmethod
    def from_config(cls, config: dict, parameters: int) -> "ModelShape":
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        merged = {**config, **text}
        hidden, heads = merged.get("hidden_size", 0), merged.get("num_attention_heads") or 1
        return cls(
            parameters=parameters,
            layers=merged.get("num_hidden_layers", 0),
            hidden_size=hidden,
            intermediate_size=merged.get("intermediate_size", 4 * hidden),
            kv_heads=merged.get("num_key_value_heads") or heads,
            head_dim=merged.get("head_dim") or hidden // heads,
            vocab_size=merged.get("vocab_size", 0),
            tied_embeddings=bool(merged.get("tie_word_embeddings", False)),
            context_length=merged.get("max_position_embeddings"),
        )

    def kv_bytes(self, tokens: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * KV_BYTES_PER_VALUE

    def boosted_parameters(self) -> int:
        """Parameters a mixed layout keeps at the higher width: output head, some v_proj and down_proj."""
        per_layer = self.hidden_size * self.kv_heads * self.head_dim + self.intermediate_size * self.hidden_size
        boosted_layers = sum(uses_more_bits(index, self.layers) for index in range(self.layers))
        return self.vocab_size * self.hidden_size + boosted_layers * per_layer


def uses_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice for Q4_K_M: the first and last eighth of the layers, and every third between."""
    eighth = layers // 8
    return layer < eighth or layer >= 7 * layers // 8 or (layer - eighth) % 3 == 2


@dataclass(frozen=True)
class SourcePrecision:
    """The source's weights: `bits` 32/16 for floats, else its quantised width and group size."""

    bits: int
    quantized: bool = False
    group_size: int | None = None

    @property
    def effective_bits(self) -> float:
        group = self.group_size or DEFAULT_GROUP_SIZE
        return self.bits + GROUP_OVERHEAD_BITS / group if self.quantized else float(self.bits)

    def describe(self) -> str:
        return f"{self.bits}-bit quantised" if self.quantized else f"{self.bits}-bit floats"


@dataclass(frozen=True)
class Layout:
    """How the converted weights are stored."""

    keeps_source: bool = False
    bits: int | None = None  # None: floats
    group_size: int = DEFAULT_GROUP_SIZE
    high_bits: int | None = None  # the higher width of a mixed layout
    dtype: str | None = None  # float dtype of the float tensors (and scales); None: as in the source

    def label(self, source: SourcePrecision) -> str:
        if self.keeps_source:
            return f"as the source ({source.describe()})" + (f", floats as {self.dtype}" if self.dtype else "")
        if self.bits is None:
            return f"16-bit floats ({self.dtype})" if FLOAT_DTYPES.get(self.dtype) == 16 else f"floats ({self.dtype})"
        mixed = f" mixed with {self.high_bits}-bit output head, v_proj and down_proj in some layers" if self.high_bits else ""
        return f"{self.bits}-bit{mixed}, group {self.group_size}"

    def id_suffix(self) -> str:
        """Told apart in model ids: `-q4`, `-q4-6` (mixed), `-bfloat16`; nothing when kept as it is."""
        if self.bits:
            return f"-q{self.bits}" + (f"-{self.high_bits}" if self.high_bits else "")
        return f"-{self.dtype}" if self.dtype else ""

    def options(self) -> dict:
        """The cache key's options: empty for a source kept exactly as it is."""
        if self.keeps_source:
            return {"dtype": self.dtype} if self.dtype else {}
        chosen = {"bits": self.bits, "group_size": self.group_size if self.bits else None,
                  "high_bits": self.high_bits, "dtype": self.dtype}
        return {name: value for name, value in chosen.items() if value is not None}


@dataclass(frozen=True)
class Budget:
    machine_bytes: int
    share: float = DEFAULT_MEMORY_SHARE

    @property
    def bytes(self) -> int:
        return int(self.machine_bytes * self.share)

    def describe(self) -> str:
        return f"{gb(self.bytes)} ({self.share:.0%} of {gb(self.machine_bytes)} machine memory)"


@dataclass(frozen=True)
class Overrides:
    """What the user forces: `bits` (2-8, or 16/32 for floats), `group_size`, `dtype`, target `context`."""

    bits: int | None = None
    group_size: int | None = None
    dtype: str | None = None
    context: int | None = None

    def as_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class Plan:
    layout: Layout
    source: SourcePrecision
    shape: ModelShape
    budget: Budget
    context: int
    forced: bool = False
    reasons: tuple[str, ...] = field(default=())

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.shape, self.source, self.layout)

    @property
    def kv_bytes(self) -> int:
        return self.shape.kv_bytes(self.context)

    @property
    def overhead_bytes(self) -> int:
        return int(OVERHEAD_FIXED_BYTES + OVERHEAD_WEIGHT_SHARE * self.weight_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget.bytes

    @property
    def quantizes(self) -> bool:
        return not self.layout.keeps_source and self.layout.bits is not None

    def options(self) -> dict:
        return self.layout.options()

    def bits_for(self, module: str) -> int:
        """The width a quantised plan gives one module (HF path, e.g. `model.layers.3.mlp.down_proj`)."""
        if self.layout.high_bits and self.boosted(module):
            return self.layout.high_bits
        return self.layout.bits

    def boosted(self, module: str) -> bool:
        if module.endswith("lm_head") or (self.shape.tied_embeddings and module.endswith("embed_tokens")):
            return True
        layer = layer_index(module)
        in_layer = module.endswith(("v_proj", "down_proj"))
        return in_layer and layer is not None and uses_more_bits(layer, self.shape.layers)

    def explanation(self) -> str:
        return "\n".join(self.reasons)

    def as_dict(self) -> dict:
        return {
            "layout": self.layout.label(self.source),
            "options": self.options(),
            "bits": self.layout.bits,
            "group_size": self.layout.group_size if self.quantizes else None,
            "high_bits": self.layout.high_bits,
            "dtype": self.layout.dtype,
            "keeps_source": self.layout.keeps_source,
            "source_bits": self.source.bits,
            "parameters": self.shape.parameters,
            "context": self.context,
            "weight_bytes": self.weight_bytes,
            "kv_cache_bytes": self.kv_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
            "budget_bytes": self.budget.bytes,
            "machine_bytes": self.budget.machine_bytes,
            "fits": self.fits,
            "forced": self.forced,
            "reasons": list(self.reasons),
        }


def layer_index(module: str) -> int | None:
    parts = module.split(".")
    after = [parts[i + 1] for i, part in enumerate(parts[:-1]) if part == "layers"]
    return int(after[0]) if after and after[0].isdigit() else None


def weight_bytes(shape: ModelShape, source: SourcePrecision, layout: Layout) -> int:
    if layout.keeps_source:
        bits = FLOAT_DTYPES[layout.dtype] if layout.dtype and not source.quantized else source.effective_bits
        return int(shape.parameters * bits / 8)
    if layout.bits is None:
        return shape.parameters * FLOAT_DTYPES[layout.dtype] // 8
    # A scale and a bias per group, in the float dtype (fp16 unless float32 is asked for).
    low = layout.bits + GROUP_OVERHEAD_BITS * FLOAT_DTYPES.get(layout.dtype, 16) / 16 / layout.group_size
    extra = (layout.high_bits - layout.bits) * shape.boosted_parameters() if layout.high_bits else 0
    return int((shape.parameters * low + extra) / 8)


def ladder(source: SourcePrecision, group_size: int = DEFAULT_GROUP_SIZE, dtype: str | None = None) -> list[Layout]:
    """Every layout worth considering for this source, best quality first, none above its precision."""
    half = dtype if FLOAT_DTYPES.get(dtype) == 16 else DEFAULT_HALF_DTYPE
    scale_dtype = dtype or (DEFAULT_HALF_DTYPE if source.bits == 32 else None)
    layouts = [Layout(keeps_source=True, dtype=dtype)]
    if not source.quantized and source.bits > 16:
        layouts.append(Layout(dtype=half))
    for bits in (b for b in LADDER_WIDTHS if b < source.bits):
        high = min(MIXED_HIGH_BITS, source.bits)
        if bits in MIXED_WIDTHS and high > bits:
            layouts.append(Layout(bits=bits, group_size=group_size, high_bits=high, dtype=scale_dtype))
        layouts.append(Layout(bits=bits, group_size=group_size, dtype=scale_dtype))
    return layouts


def target_context(shape: ModelShape, requested: int | None) -> int:
    if requested:
        return requested
    return min(shape.context_length or FALLBACK_CONTEXT, DEFAULT_CONTEXT_TARGET)


def choose(shape: ModelShape, source: SourcePrecision, budget: Budget, overrides: Overrides = Overrides()) -> Plan:
    """The plan for this model on this machine: forced by `overrides.bits`, else the best that fits."""
    check_overrides(overrides)
    context = target_context(shape, overrides.context)
    if overrides.bits is not None:
        return forced_plan(shape, source, budget, overrides, context)
    layouts = ladder(source, group_size(overrides), overrides.dtype)
    shortest = context if overrides.context else min(context, MINIMUM_CONTEXT)
    for candidates, tokens in attempts(layouts, context, shortest):
        plan = best_fit(candidates, source, shape, budget, tokens)
        if plan is not None:
            return plan if tokens == context else with_reason(plan, context_note(context, tokens))
    raise ConversionError(does_not_fit(Plan(layouts[-1], source, shape, budget, shortest)))


def attempts(layouts: list[Layout], context: int, shortest: int) -> list[tuple[list[Layout], int]]:
    """In order: 4 bits or more at the target context, then at the shortest, then below 4 bits likewise."""
    wide = [layout for layout in layouts if layout.keeps_source or layout.bits is None or layout.bits >= FLOOR_BITS]
    narrow = [layout for layout in layouts if layout not in wide]
    tries = [(wide, context), (wide, shortest), (narrow, context), (narrow, shortest)]
    if shortest == context:
        tries = [tries[0], tries[2]]
    return [(candidates, tokens) for candidates, tokens in tries if candidates]


def best_fit(layouts: list[Layout], source, shape, budget, context: int) -> Plan | None:
    """The first of `layouts` that fits, with the reasons it was chosen; None if none fits."""
    plans = [Plan(layout, source, shape, budget, context) for layout in layouts]
    index = next((i for i, plan in enumerate(plans) if plan.fits), None)
    if index is None:
        return None
    return Plan(plans[index].layout, source, shape, budget, context, reasons=auto_reasons(plans[index], plans[:index]))


def context_note(target: int, tokens: int) -> str:
    return (f"context reduced from {target:,} to {tokens:,} tokens: a shorter KV cache is preferred to "
            f"weights below {FLOOR_BITS} bits (ask for more with --context)")


def with_reason(plan: Plan, reason: str) -> Plan:
    return Plan(plan.layout, plan.source, plan.shape, plan.budget, plan.context, plan.forced, (*plan.reasons, reason))


def group_size(overrides: Overrides) -> int:
    return overrides.group_size or DEFAULT_GROUP_SIZE


def check_overrides(overrides: Overrides) -> None:
    if overrides.bits is not None and overrides.bits not in (*MLX_WIDTHS, 16, 32):
        raise ConversionError(f"--bits {overrides.bits}: MLX quantises to 2, 3, 4, 5, 6 or 8 bits; use 16 or 32 for floats")
    if overrides.group_size is not None and overrides.group_size not in GROUP_SIZES:
        raise ConversionError(f"--group-size {overrides.group_size}: MLX groups 32, 64 or 128 weights")
    if overrides.dtype is not None and overrides.dtype not in FLOAT_DTYPES:
        raise ConversionError(f"--dtype {overrides.dtype}: use float16, bfloat16 or float32")
    if overrides.context is not None and overrides.context <= 0:
        raise ConversionError(f"--context {overrides.context}: give a positive number of tokens")


def forced_layout(source: SourcePrecision, overrides: Overrides) -> Layout:
    bits, dtype = overrides.bits, overrides.dtype
    if bits >= source.bits:
        return Layout(keeps_source=True, dtype=dtype)
    if bits == 16:
        return Layout(dtype=dtype if FLOAT_DTYPES.get(dtype) == 16 else DEFAULT_HALF_DTYPE)
    scale_dtype = dtype or (DEFAULT_HALF_DTYPE if source.bits == 32 else None)
    return Layout(bits=bits, group_size=group_size(overrides), dtype=scale_dtype)


def forced_plan(shape, source, budget, overrides: Overrides, context: int) -> Plan:
    plan = Plan(forced_layout(source, overrides), source, shape, budget, context, forced=True)
    reasons = [f"forced: --bits {overrides.bits}", *common_reasons(plan)]
    if plan.layout.keeps_source and overrides.bits > source.bits:
        reasons.append(f"the source is {source.describe()}: kept as it is, never widened to {overrides.bits} bits")
    reasons.append(sizing(plan, "chosen"))
    if not plan.fits:
        reasons.append(f"warning: this is over the budget of {budget.describe()}")
    return Plan(plan.layout, source, shape, budget, context, forced=True, reasons=tuple(reasons))


def common_reasons(plan: Plan) -> list[str]:
    shape = plan.shape
    return [
        f"model: {count(shape.parameters)} parameters, source {plan.source.describe()}",
        f"budget: {plan.budget.describe()}",
        f"KV cache: {gb(plan.kv_bytes)} for {plan.context:,} tokens "
        f"({shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} dims, fp16)",
    ]


def auto_reasons(chosen: Plan, rejected: list[Plan]) -> tuple[str, ...]:
    reasons = common_reasons(chosen)
    reasons += [sizing(plan, "too big") for plan in rejected]
    reasons.append(sizing(chosen, "chosen"))
    if chosen.layout.keeps_source:
        reasons.append("it fits at the source's own precision, so nothing is lost")
    return tuple(reasons)


def sizing(plan: Plan, verdict: str) -> str:
    sign = "<=" if plan.fits else ">"
    return (f"{verdict}: {plan.layout.label(plan.source)}: weights {gb(plan.weight_bytes)} + KV {gb(plan.kv_bytes)} "
            f"+ overhead {gb(plan.overhead_bytes)} = {gb(plan.total_bytes)} {sign} {gb(plan.budget.bytes)}")


def does_not_fit(smallest: Plan) -> str:
    return (f"{count(smallest.shape.parameters)} parameters do not fit the memory budget of {smallest.budget.describe()}: "
            f"even {smallest.layout.label(smallest.source)} needs {gb(smallest.total_bytes)} with a {smallest.context:,}-token "
            "KV cache; use a smaller model, a shorter --context, a larger IMPETUS_MEMORY_SHARE, or force --bits")


def gb(size: float) -> str:
    return f"{size / GB:.2f} GB" if size >= GB / 100 else f"{size / 1e6:.2f} MB"


def count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 10**9 else f"{parameters / 1e6:.1f} M"
