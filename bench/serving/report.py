"""The report: a markdown table, one row an engine, and the goals of issue 5 as ratios between engines
(PASS/FAIL against each goal; "info" where the issue sets none; "n/a" where an engine did not run)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.harness import fmt, machine_line, markdown_table
from bench.serving.results import Result
from bench.serving.workload import Workload

# (what is compared, numerator (engine, figure), denominator (engine, figure), goal or None).
# A figure is a median attribute of the samples, or ("aggregate", level) for N clients' rate.
GOALS = [
    ("decode: Impetus / raw mlx-lm float32+OpenBLAS (like for like)", ("impetus", "decode_tps"), ("raw-fp32", "decode_tps"), 0.97),
    ("decode: Impetus / raw mlx-lm as converted (Q4)", ("impetus", "decode_tps"), ("raw-q4", "decode_tps"), None),
    ("decode: Impetus / mlx_lm.server + OpenBLAS", ("impetus", "decode_tps"), ("mlx-server-openblas", "decode_tps"), 1.0),
    ("decode: Impetus / mlx_lm.server (its own BLAS)", ("impetus", "decode_tps"), ("mlx-server", "decode_tps"), 1.0),
    ("aggregate: Impetus 4 clients / 1 client", ("impetus", ("aggregate", 4)), ("impetus", ("aggregate", 1)), 3.0),
    ("aggregate: mlx_lm.server + OpenBLAS 4 clients / 1 client",
     ("mlx-server-openblas", ("aggregate", 4)), ("mlx-server-openblas", ("aggregate", 1)), None),
    ("prefill: Impetus / llama.cpp", ("impetus", "prefill_tps"), ("llama-cpp", "prefill_tps"), 0.5),
    ("decode: Impetus / llama.cpp", ("impetus", "decode_tps"), ("llama-cpp", "decode_tps"), 0.25),
]


def row(result: Result, levels: list[int]) -> list[str]:
    if result.error:
        return [result.label, result.error, *["—"] * (5 + len(levels))]
    prefix = result.prefix
    cached = (f"{fmt(prefix['cold_ttft'])} → {fmt(prefix['cached_ttft'])}"
              + (f" ({prefix['cached_tokens']} cached)" if prefix.get("cached_tokens") is not None else "")
              if prefix else "—")
    aggregates = [fmt(result.aggregate.get(str(level)), 1) for level in levels]
    rss = f"{result.peak_rss_bytes / 2**20:.0f}" if result.peak_rss_bytes else "—"
    return [result.label, result.blas or "—", fmt(result.median("ttft")), fmt(result.median("prefill_tps"), 1),
            fmt(result.median("decode_tps"), 1), *aggregates, cached, rss]


def table(results: list[Result], levels: list[int]) -> str:
    header = ["engine", "BLAS", "TTFT s", "prefill tok/s", "decode tok/s",
              *[f"{n} client{'s' if n > 1 else ''} tok/s" for n in levels], "prefix TTFT s cold → shared", "peak RSS MiB"]
    return markdown_table(header, [row(r, levels) for r in results])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def figure(results: dict[str, Result], engine: str, name) -> float | None:
    """One engine's figure for a goal; None where the engine did not run or failed."""
    result = results.get(engine)
    if not result or result.error:
        return None
    if isinstance(name, tuple):  # ("aggregate", level)
        return result.aggregate.get(str(name[1]))
    return result.median(name)


def goal_lines(results: dict[str, Result]) -> list[str]:
    lines = []
    for name, numerator, denominator, goal in GOALS:
        value = ratio(figure(results, *numerator), figure(results, *denominator))
        verdict = "n/a" if value is None else ("info" if goal is None else ("PASS" if value >= goal else "FAIL"))
        target = f" (goal ≥ {goal:g})" if goal is not None else ""
        lines.append(f"- {name}: {fmt(value)}×{target} — {verdict}")
    return lines + round_lines(results.get("impetus"))


def round_lines(result: Result | None) -> list[str]:
    """The 4-client goal's ratio in each round (the goal line takes the medians of each level)."""
    rounds = result.aggregate_rounds if result and not result.error else {}
    if "1" not in rounds or "4" not in rounds:
        return []
    ratios = ", ".join(f"{four / one:.2f}×" for one, four in zip(rounds["1"], rounds["4"]))
    return [f"- Impetus 4 clients / 1 client, round by round: {ratios}"]


def report(results: list[Result], levels: list[int], info: dict, work: Workload, args) -> str:
    by_engine = {r.engine: r for r in results}
    prompt_tokens = next((s["prompt_tokens"] for r in results for s in r.samples), None)
    notes = [f"- {r.label}: {r.note}; aggregate: {r.aggregate_note}" for r in results if not r.error]
    return "\n".join([
        f"# Serving benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "",
        f"Machine: {machine_line(info)}.",
        (f"Model: {Path(work.gguf).name}. Prompt ≈{prompt_tokens} tokens, {work.decode_tokens} tokens decoded greedily, "
         f"median of {len(work.prompts)}; concurrent clients get {work.client_tokens} tokens each, median of "
         f"{len(work.client_rounds)} rounds; the prefix pair "
         f"shares ≈{args.prefix_tokens} tokens. OPENBLAS_NUM_THREADS: {args.openblas_threads or 'unset'}."), "",
        table(results, levels), "",
        ("TTFT is wall time to the first text (HTTP included for servers); prefill tok/s = prompt tokens / TTFT; "
         "decode tok/s = (tokens − 1) / (last − first token time). BLAS is what the process had mapped."), "",
        *notes, "", "## Goals of issue 5", "", *goal_lines(by_engine), "",
    ])
