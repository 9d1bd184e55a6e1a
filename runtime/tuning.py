"""How a model runs fastest on this machine: decided at load by measuring, not from tables.

Candidates are the layout as converted and, when a float32 copy fits the memory plan, float32 (on
a CPU, MLX's float32 products go to the BLAS while its quantised kernels are naive; on a GPU the
quantised kernels usually win); for float32 on OpenBLAS, also each thread count worth trying. Each
candidate prefills a short probe and decodes a few steps; the layout that would finish a typical
agent turn soonest wins, and with it the thread counts that prefilled and decoded fastest (the batch
switches between them as it prefills or only decodes). Choices are remembered per model and machine in `tuning.json`, so only a
model's first load on a machine pays for the probes (about a second per candidate).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from hardware import available_memory, cpu_description
from runtime.cpu import blas

log = logging.getLogger(__name__)

AS_CONVERTED, FLOAT32 = "as converted", "float32"
# An agent turn once the prefix cache holds the conversation so far: new prompt tokens, reply tokens.
TURN_PROMPT_TOKENS, TURN_REPLY_TOKENS = 512, 256
PROBE_CHUNK = 32  # prompt tokens per prefill step of the probe
PROBE_PROMPT_TOKENS, PROBE_DECODE_STEPS = 128, 16
PROBE_SECONDS = 1.5  # each phase of a probe stops after this long, at a step's end
# A float32 copy may take at most this share of the memory available now.
FP32_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Candidate:
    layout: str
    threads: int | None = None  # OpenBLAS threads; None where no BLAS thread count applies


@dataclass(frozen=True)
class Measurement:
    candidate: Candidate
    prefill_tps: float
    decode_tps: float

    @property
    def turn_seconds(self) -> float:
        return turn_seconds([self])

    def describe(self) -> dict:
        return {**asdict(self.candidate), "prefill_tps": round(self.prefill_tps, 1),
                "decode_tps": round(self.decode_tps, 2), "turn_seconds": round(self.turn_seconds, 2)}


@dataclass
class Tuning:
    """What a loaded model runs with, and why."""
    layout: str = AS_CONVERTED
    threads: int | None = None  # OpenBLAS threads while only decoding
    reason: str = "only candidate"  # measured | remembered | only candidate | set by settings
    measurements: list[dict] = field(default_factory=list)
    prefill_threads: int | None = None  # while a prompt is being prefilled
    # Measured on real traffic, by batch size: the decode threads, and the median step by thread count.
    batch_threads: dict[int, int] = field(default_factory=dict)
    serving_step_ms: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.prefill_threads = self.prefill_threads or self.threads
        # From tuning.json: JSON keeps keys as strings, and files of earlier versions held None.
        self.batch_threads = {int(size): threads for size, threads in (self.batch_threads or {}).items()}
        self.serving_step_ms = {int(size): steps for size, steps in (self.serving_step_ms or {}).items()}

    def threads_for(self, batch_size: int) -> int | None:
        return self.batch_threads.get(batch_size, self.threads)

    @classmethod
    def chosen(cls, measurements: list[Measurement]) -> "Tuning":
        layouts = {m.candidate.layout for m in measurements}
        layout = min(layouts, key=lambda name: turn_seconds([m for m in measurements if m.candidate.layout == name]))
        mine = [m for m in measurements if m.candidate.layout == layout]
        decode = max(mine, key=lambda m: m.decode_tps).candidate.threads
        prefill = max(mine, key=lambda m: m.prefill_tps).candidate.threads
        return cls(layout, decode, "measured", [m.describe() for m in measurements], prefill)


def turn_seconds(measurements: list[Measurement]) -> float:
    """A typical agent turn with the fastest prefill and the fastest decode among these."""
    prefill, decode = max(m.prefill_tps for m in measurements), max(m.decode_tps for m in measurements)
    return TURN_PROMPT_TOKENS / prefill + TURN_REPLY_TOKENS / decode


def as_float32(model):
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def is_float32(model) -> bool:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return all(value.dtype == mx.float32 for _, value in tree_flatten(model.parameters()))


def fits_as_float32(parameters: int) -> bool:
    return parameters * 4 < FP32_MEMORY_SHARE * available_memory()


def thread_counts() -> list[int | None]:
    """OpenBLAS thread counts worth trying: powers of two up to the usable cores, and all of them."""
    if blas.threads() is None:
        return [None]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return sorted({usable, *(1 << i for i in range(usable.bit_length()) if 1 << i <= usable)})


def machine_fingerprint() -> str:
    """What the measurements depend on besides the model: a change means measuring again."""
    import mlx.core as mx

    from runtime.cpu.ops import installed

    report = blas.report()
    parts = [platform.machine(), cpu_description().get("model"), cpu_description().get("usable_cores"),
             mx.__version__, str(mx.default_device()), report["sgemm_from"], report["single_row_gemv"],
             ",".join(installed())]
    return "|".join(str(part) for part in parts)


def forward(model, tokens, cache) -> None:
    """One model step over `tokens`, evaluated as far as the next token, as generation does."""
    import mlx.core as mx

    logits = model(tokens[None], cache=cache)
    mx.eval(mx.argmax(logits[:, -1], axis=-1))


def rate(step, units_per_step: int, most_steps: int) -> float:
    """Units per second of `step`'s median run, over `most_steps` runs or PROBE_SECONDS (at least one):
    the median, so that one run slowed by other work on the machine does not decide."""
    started, durations = time.perf_counter(), []
    while len(durations) < most_steps and (not durations or time.perf_counter() - started < PROBE_SECONDS):
        begun = time.perf_counter()
        step(len(durations))
        durations.append(time.perf_counter() - begun)
    return units_per_step / statistics.median(durations)


def probe(model) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of `model` on a fresh KV cache; the token ids do not matter."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    tokens = mx.arange(PROBE_PROMPT_TOKENS) % 8 + 1
    forward(model, tokens[:4], make_prompt_cache(model))  # first-call allocations are not the model's speed
    cache = make_prompt_cache(model)
    prefill = rate(lambda i: forward(model, tokens[i * PROBE_CHUNK:(i + 1) * PROBE_CHUNK], cache),
                   PROBE_CHUNK, PROBE_PROMPT_TOKENS // PROBE_CHUNK)
    forward(model, tokens[:1], cache)
    decode = rate(lambda i: forward(model, tokens[i:i + 1], cache), 1, PROBE_DECODE_STEPS)
    return prefill, decode


def measure(model, candidates: list[Candidate]) -> list[Measurement]:
    measurements = []
    for candidate in candidates:
        blas.set_threads(candidate.threads)
        measurements.append(Measurement(candidate, *probe(model)))
        log.info("probe %s: %s", candidate, measurements[-1].describe())
    return measurements


class Tuner:
    """Chooses each model's layout and BLAS threads; `layout` and `threads` pin them instead."""

    def __init__(self, path: Path | None = None, layout: str = "auto", threads: int | None = None, retune: bool = False):
        self.path = path  # tuning.json; None: measure at every load, remember nothing
        self.layout = layout
        self.threads = threads
        self.retune = retune

    def tune(self, entry, model, reload):
        """(the model in its chosen layout, the Tuning); `reload()` gives the model as converted again."""
        candidates = self.candidates(entry, model)
        if len(candidates) == 1:
            reason = "only candidate" if self.layout == "auto" and self.threads is None else "set by settings"
            return self.apply(model, Tuning(candidates[0].layout, candidates[0].threads, reason))
        tuning = self.remembered(entry.key)
        if tuning is None:
            tuning = self.measured(model, candidates)  # leaves `model` in float32 if that was measured
            self.remember(entry.key, tuning)
            if tuning.layout == AS_CONVERTED and any(c.layout == FLOAT32 for c in candidates):
                model = reload()
        return self.apply(model, tuning)

    def candidates(self, entry, model) -> list[Candidate]:
        threads = [t for t in thread_counts() if self.threads in (None, t)] or [self.threads]
        if is_float32(model):
            found = [Candidate(AS_CONVERTED, t) for t in threads]
        else:
            found = [Candidate(AS_CONVERTED)]
            found += [Candidate(FLOAT32, t) for t in threads] if fits_as_float32(entry.parameters) else []
        return [c for c in found if self.layout in ("auto", c.layout)] or [Candidate(self.layout, self.threads)]

    @staticmethod
    def measured(model, candidates: list[Candidate]) -> Tuning:
        measurements = measure(model, [c for c in candidates if c.layout == AS_CONVERTED])
        if wider := [c for c in candidates if c.layout == FLOAT32]:
            measurements += measure(as_float32(model), wider)  # in place: the caller reloads if need be
        return Tuning.chosen(measurements)

    @staticmethod
    def apply(model, tuning: Tuning):
        blas.set_threads(tuning.threads)
        if tuning.layout == FLOAT32 and not is_float32(model):
            model = as_float32(model)
        return model, tuning

    def remembered(self, model_key: str) -> Tuning | None:
        if self.path is None or self.retune or not self.path.exists():
            return None
        try:
            known = json.loads(self.path.read_text()).get(machine_fingerprint(), {}).get(model_key)
        except (OSError, ValueError) as exc:  # a damaged file only costs a new measurement
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return None
        return Tuning(**{**known, "reason": "remembered"}) if known else None

    def remember(self, model_key: str, tuning: Tuning) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            try:
                known = json.loads(self.path.read_text()) if self.path.exists() else {}
            except ValueError:
                known = {}
            known.setdefault(machine_fingerprint(), {})[model_key] = asdict(tuning)
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(known, indent=1))
            partial.replace(self.path)


class DecodeThreads:
    """Re-measures the decode thread count on real traffic, where the server's own work shares the cores
    with the BLAS threads (a load-time probe runs alone), for each batch size apart: one sequence and a
    few differ in how much arithmetic each weight loaded from memory carries, so a second thread can win
    for one and lose for the other. After FIRST_TRIAL decode-only steps at a batch size, and every
    TRIAL_EVERY after, the candidates take turns for TRIAL_STEPS steps each at that size (other sizes in
    between do not spoil it), and the fastest median step is kept for that size."""

    FIRST_TRIAL, TRIAL_EVERY, TRIAL_STEPS = 4, 1024, 8

    def __init__(self, tuning: Tuning):
        self.tuning = tuning
        self.candidates = sorted({m["threads"] for m in tuning.measurements
                                  if m["layout"] == tuning.layout and m["threads"] is not None})
        self.steps: Counter[int] = Counter()  # decode-only steps seen, by batch size
        self.trials: dict[int, dict[int, list[float]]] = {}  # batch size -> candidate -> step seconds

    def next(self, batch_size: int) -> int | None:
        """The thread count for the next decode-only step of a batch of `batch_size`."""
        if len(self.candidates) < 2:
            return self.tuning.threads
        if batch_size not in self.trials and self._trial_due(batch_size):
            self.trials[batch_size] = {c: [] for c in self.candidates}
        if trial := self.trials.get(batch_size):
            return min(trial, key=lambda candidate: len(trial[candidate]))  # in turns, so drift hits all alike
        return self.tuning.threads_for(batch_size)

    def record(self, batch_size: int, threads: int | None, seconds: float) -> None:
        self.steps[batch_size] += 1
        trial = self.trials.get(batch_size)
        if trial is not None and threads in trial:
            trial[threads].append(seconds)
            if all(len(times) >= self.TRIAL_STEPS for times in trial.values()):
                self._conclude(batch_size, self.trials.pop(batch_size))

    def _trial_due(self, batch_size: int) -> bool:
        seen = self.steps[batch_size]
        return seen == self.FIRST_TRIAL or (seen > self.FIRST_TRIAL and seen % self.TRIAL_EVERY == 0)

    def _conclude(self, batch_size: int, trial: dict[int, list[float]]) -> None:
        medians = {c: statistics.median(times) for c, times in trial.items()}
        best, before = min(medians, key=medians.get), self.tuning.threads_for(batch_size)
        if best != before:
            log.info("decode threads for %d sequence(s) %s -> %d on real traffic (median step %s)", batch_size, before,
                     best, {c: f"{m * 1000:.1f} ms" for c, m in medians.items()})
        self.tuning.batch_threads[batch_size] = best
        self.tuning.serving_step_ms[batch_size] = {c: round(m * 1000, 2) for c, m in medians.items()}
        if batch_size == 1:
            self.tuning.threads = best
