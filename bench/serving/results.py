"""What one engine's run yields: a `Sample` per timed request, and a `Result` with the samples, the
aggregate rates of concurrent clients, the cached-prefix TTFT, peak RSS and BLAS. A `Result` goes
through JSON, from a worker process to the parent, so it holds plain data."""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field

from bench.harness import fmt

log = logging.getLogger("serve_bench")

ENGINES = ("raw-q4", "raw-fp32", "impetus", "mlx-server", "mlx-server-openblas", "llama-cpp")
LABELS = {
    "raw-q4": "raw mlx-lm, as converted (Q4)",
    "raw-fp32": "raw mlx-lm, float32 + OpenBLAS (server layout)",
    "impetus": "Impetus server",
    "mlx-server": "mlx_lm.server, as converted (Q4)",
    "mlx-server-openblas": "mlx_lm.server, Q4 + OpenBLAS preload",
    "llama-cpp": "llama.cpp (llama-cpp-python), GGUF",
}


@dataclass
class Sample:
    ttft: float
    prompt_tokens: int
    completion_tokens: int
    decode_seconds: float
    cached_tokens: int | None = None
    wall: float = 0.0  # request start to last token

    @property
    def completion_tokens_rate(self) -> float:
        return self.completion_tokens / self.wall

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft

    @property
    def decode_tps(self) -> float | None:
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


@dataclass
class Result:
    engine: str
    label: str
    note: str = ""
    samples: list[dict] = field(default_factory=list)
    aggregate: dict[str, float] = field(default_factory=dict)  # str(level) -> tok/s, the rounds' median
    aggregate_rounds: dict[str, list[float]] = field(default_factory=dict)  # str(level) -> each round's tok/s
    aggregate_note: str = ""
    prefix: dict = field(default_factory=dict)  # cold_ttft, cached_ttft, cached_tokens
    peak_rss_bytes: int | None = None
    blas: str | None = None
    error: str | None = None

    def sample_objects(self) -> list[Sample]:
        return [Sample(**s) for s in self.samples]

    def median(self, attribute: str) -> float | None:
        values = [v for s in self.sample_objects() if (v := getattr(s, attribute)) is not None]
        return statistics.median(values) if values else None


def failed(engine: str, error: str) -> Result:
    return Result(engine, LABELS[engine], error=error)


def record(result: Result, sample: Sample) -> None:
    result.samples.append(asdict(sample))
    log.info("  %s: ttft %.2fs, %d prompt tokens (%.1f tok/s), %d tokens at %s tok/s", result.engine, sample.ttft,
             sample.prompt_tokens, sample.prefill_tps, sample.completion_tokens, fmt(sample.decode_tps, 1))


def record_rounds(result: Result, rounds: list[dict[str, float]]) -> None:
    """Each round's aggregate rates, and their median by level: one round of a few seconds is noisy."""
    result.aggregate_rounds = {level: [rates[level] for rates in rounds] for level in rounds[0]}
    result.aggregate = {level: statistics.median(values) for level, values in result.aggregate_rounds.items()}
