"""The quantisation planner over machine sizes x model sizes x source precisions: every plan fits its
budget, no strictly better layout would have fitted, nothing is widened above the source, no 7 bits."""

from __future__ import annotations

import os
import sys

import pytest

from converters.planner import (
    MINIMUM_CONTEXT,
    MLX_WIDTHS,
    Budget,
    Layout,
    ModelShape,
    Overrides,
    Plan,
    SourcePrecision,
    choose,
    ladder,
)
from errors import ConversionError

GIB = 2**30
MACHINES_GB = [8, 16, 24, 36, 64, 128, 192]

# Shapes of real model families (layers, hidden, intermediate, KV heads, head dim, vocab, tied, context).
MODELS = {
    "0.1B": ModelShape(135_000_000, 30, 576, 1536, 3, 64, 49152, True, 8192),
    "0.5B": ModelShape(494_000_000, 24, 896, 4864, 2, 64, 151936, True, 32768),
    "1B": ModelShape(1_240_000_000, 16, 2048, 8192, 8, 64, 128256, True, 131072),
    "3B": ModelShape(3_210_000_000, 28, 3072, 8192, 8, 128, 128256, True, 131072),
    "7B": ModelShape(7_620_000_000, 28, 3584, 18944, 4, 128, 152064, False, 32768),
    "8B": ModelShape(8_030_000_000, 32, 4096, 14336, 8, 128, 128256, False, 131072),
    "14B": ModelShape(14_800_000_000, 48, 5120, 13824, 8, 128, 152064, False, 32768),
    "32B": ModelShape(32_800_000_000, 64, 5120, 27648, 8, 128, 152064, False, 32768),
    "70B": ModelShape(70_600_000_000, 80, 8192, 28672, 8, 128, 128256, False, 131072),
}
SOURCES = {
    "fp32": SourcePrecision(32),
    "fp16": SourcePrecision(16),
    "q8": SourcePrecision(8, quantized=True, group_size=32),
    "q4": SourcePrecision(4, quantized=True, group_size=32),
}
CASES = [(gb, model, source) for gb in MACHINES_GB for model in MODELS for source in SOURCES]


def plan_or_none(machine_gb: int, model: str, source: str) -> Plan | None:
    try:
        return choose(MODELS[model], SOURCES[source], Budget(machine_gb * GIB))
    except ConversionError:
        return None


def independent_total(plan: Plan) -> float:
    """Weights + fp16 KV + at least the fixed overhead, computed here from first principles."""
    shape = plan.shape
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * plan.context * 2
    layout = plan.layout
    if layout.keeps_source:
        bits = plan.source.bits + (32 / plan.source.group_size if plan.source.quantized else 0)
    elif layout.bits is None:
        bits = 16
    else:  # a mixed layout only adds to this
        bits = layout.bits + 32 / layout.group_size
    return shape.parameters * bits / 8 + kv + 512 * 2**20


@pytest.mark.parametrize("machine_gb, model, source", CASES)
def test_plan_fits_and_no_better_layout_would(machine_gb, model, source):
    plan = plan_or_none(machine_gb, model, source)
    if plan is None:  # then not even the smallest layout fits with the minimum context
        smallest = ladder(SOURCES[source])[-1]
        assert not Plan(smallest, SOURCES[source], MODELS[model], Budget(machine_gb * GIB), MINIMUM_CONTEXT).fits
        return
    assert plan.total_bytes <= plan.budget.bytes == int(machine_gb * GIB * 0.75)
    assert independent_total(plan) <= plan.total_bytes <= plan.budget.bytes
    options = ladder(plan.source)
    better = options[:options.index(plan.layout)]
    assert not any(Plan(layout, plan.source, plan.shape, plan.budget, plan.context).fits for layout in better)
    assert plan.reasons and "chosen" in plan.explanation()


@pytest.mark.parametrize("machine_gb, model, source", CASES)
def test_never_above_the_source_and_only_mlx_widths(machine_gb, model, source):
    plan = plan_or_none(machine_gb, model, source)
    if plan is None:
        return
    layout, source_bits = plan.layout, SOURCES[source].bits
    if not layout.keeps_source:
        assert layout.bits is None and source_bits == 32 or layout.bits in MLX_WIDTHS and layout.bits < source_bits
    assert layout.high_bits is None or layout.high_bits in MLX_WIDTHS and layout.high_bits <= source_bits
    assert 7 not in (layout.bits, layout.high_bits)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("source", SOURCES)
def test_more_memory_never_gives_a_worse_plan(model, source):
    options = ladder(SOURCES[source])
    ranks = [options.index(plan.layout) for gb in MACHINES_GB if (plan := plan_or_none(gb, model, source))]
    assert ranks == sorted(ranks, reverse=True)


def test_known_points():
    eight_b, fp16 = MODELS["8B"], SOURCES["fp16"]
    assert choose(eight_b, fp16, Budget(64 * GIB)).layout.keeps_source
    assert choose(eight_b, fp16, Budget(16 * GIB)).layout == Layout(bits=6)
    small = choose(MODELS["0.1B"], SOURCES["fp32"], Budget(8 * GIB))
    assert small.layout.keeps_source and small.options() == {}  # tiny models stay lossless everywhere
    # A 4-bit source on a big machine is kept as it is, never widened.
    assert choose(MODELS["70B"], SOURCES["q4"], Budget(192 * GIB)).layout.keeps_source


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(ConversionError, match=r"do not fit the memory budget of 6\.44 GB .*even 3-bit"):
        choose(MODELS["70B"], SOURCES["fp16"], Budget(8 * GIB))


def test_short_memory_reduces_the_context_before_giving_up():
    plan = choose(MODELS["8B"], SOURCES["fp16"], Budget(8 * GIB))
    assert plan.context == MINIMUM_CONTEXT and plan.fits and "context reduced" in plan.explanation()


def test_mixed_layout_boosts_output_head_and_some_v_down_proj():
    plan = Plan(Layout(bits=4, high_bits=6), SOURCES["fp16"], MODELS["8B"], Budget(16 * GIB), 4096)
    assert plan.bits_for("lm_head") == 6 and plan.bits_for("model.embed_tokens") == 4
    assert plan.bits_for("model.layers.0.mlp.down_proj") == 6 and plan.bits_for("model.layers.0.mlp.up_proj") == 4
    boosted = [i for i in range(32) if plan.bits_for(f"model.layers.{i}.self_attn.v_proj") == 6]
    assert boosted[:4] == [0, 1, 2, 3] and boosted[-4:] == [28, 29, 30, 31] and len(boosted) == 16
    assert Plan(Layout(bits=4), *plan_parts(plan)).weight_bytes < plan.weight_bytes < Plan(Layout(bits=5), *plan_parts(plan)).weight_bytes


def plan_parts(plan: Plan):
    return plan.source, plan.shape, plan.budget, plan.context


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (Overrides(bits=4), Layout(bits=4, dtype="bfloat16")),
        (Overrides(bits=16), Layout(dtype="bfloat16")),
        (Overrides(bits=3, group_size=32, dtype="float16"), Layout(bits=3, group_size=32, dtype="float16")),
        (Overrides(bits=32), Layout(keeps_source=True)),
    ],
)
def test_forced_bits(overrides, expected):
    plan = choose(MODELS["0.1B"], SOURCES["fp32"], Budget(8 * GIB), overrides)
    assert plan.layout == expected and plan.forced and "forced" in plan.explanation()


def test_forced_bits_never_widen_a_quantised_source():
    plan = choose(MODELS["8B"], SOURCES["q4"], Budget(64 * GIB), Overrides(bits=8))
    assert plan.layout.keeps_source and plan.options() == {} and "never widened" in plan.explanation()


@pytest.mark.parametrize("overrides, message", [
    (Overrides(bits=7), "2, 3, 4, 5, 6 or 8 bits"),
    (Overrides(group_size=48), "32, 64 or 128"),
    (Overrides(dtype="int8"), "float16, bfloat16 or float32"),
])
def test_impossible_overrides_are_refused(overrides, message):
    with pytest.raises(ConversionError, match=message):
        choose(MODELS["1B"], SOURCES["fp16"], Budget(16 * GIB), overrides)


def test_hardware_probe_describes_this_machine():
    from converters.pipeline import sizing_report
    from hardware import machine_memory, physical_memory, probe
    from runtime.cpu.blas import loaded_blas

    report = probe()
    assert report["cpu"]["cores"] == os.cpu_count() and report["memory"]["total_bytes"] == physical_memory()
    assert 0 < report["memory"]["available_bytes"] <= report["memory"]["total_bytes"]
    assert report["memory"]["usable_bytes"] == machine_memory() <= physical_memory()
    assert report["accelerator"]["default_device"].startswith("Device(")
    if sys.platform.startswith("linux"):
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        assert physical_memory() // 1024 == pytest.approx(int(meminfo["MemTotal"].split()[0]), rel=0.01)
        assert loaded_blas() in {"openblas", "mkl", "blis", "libblas", "reference"} and report["cpu"]["model"]
    sizing = sizing_report()
    assert sizing["budget_bytes"] == int(sizing["machine_bytes"] * sizing["memory_share"])


def test_numpy_own_openblas_is_not_taken_for_mlx_s():
    """numpy maps `libscipy_openblas64_`; only a preloaded libopenblas speeds MLX up."""
    import os

    import numpy  # noqa: F401  (maps numpy's bundled BLAS into this process)

    from runtime.cpu.blas import loaded_blas

    preloaded = "openblas" in os.environ.get("LD_PRELOAD", "")
    assert (loaded_blas() == "openblas") == preloaded
