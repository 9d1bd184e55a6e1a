"""The MLX runtime: one resident model, one generation at a time, on one worker thread.

MLX work (loading and generating) happens on a single thread that owns the model; callers
submit jobs and read their events from a queue, so the HTTP layer never blocks on MLX.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cache.store import Entry, ModelStore
from converters.errors import ImpetusError, ModelNotFoundError
from runtime.errors import ModelLoadError
from runtime.hardware import prefers_fp32_weights
from runtime.generation import Failed, Finished, Plan, SamplingParams, Started, generate, token_budget
from runtime.plans import parser_for, processors_for
from runtime.prompt_cache import PromptCache
from runtime.tools import ToolDialect, dialect_for

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096


@dataclass
class LoadedModel:
    entry: Entry
    model: object
    tokenizer: object
    dialect: ToolDialect
    layout: str = "as converted"  # or "float32" when dequantised for the CPU
    _grammar_tokenizer: object = None

    @property
    def cache_key(self) -> str:
        """Prompt caches are only valid for the same weights in the same layout."""
        return f"{self.entry.key}-{self.layout.replace(' ', '-')}"

    @property
    def context_length(self) -> int:
        return self.entry.context_length or DEFAULT_CONTEXT

    def grammar_tokenizer(self):
        """llguidance's tokenizer, built on first use (about a second)."""
        if self._grammar_tokenizer is None:
            from runtime.constraints import ll_tokenizer

            self._grammar_tokenizer = ll_tokenizer(self.tokenizer)
        return self._grammar_tokenizer


@dataclass
class Job:
    entry: Entry
    prompt: object  # ChatPrompt or TextPrompt
    params: SamplingParams
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class RuntimeStats:
    state: str = "idle"  # idle | loading | generating
    requests: int = 0
    last_tokens_per_second: float | None = None
    last_prompt_tokens: int | None = None

    def record(self, finished: Finished, seconds: float) -> None:
        self.requests += 1
        self.last_prompt_tokens = finished.prompt_tokens
        if finished.completion_tokens and seconds > 0:
            self.last_tokens_per_second = round(finished.completion_tokens / seconds, 2)


class Runtime:
    def __init__(self, store: ModelStore, aliases: dict[str, str] | None = None, prompt_cache: PromptCache | None = None):
        self.store = store
        self.aliases = aliases or {}
        self.prompt_cache = prompt_cache or PromptCache(None, max_bytes=1 << 30)
        self.loaded: LoadedModel | None = None
        self.stats = RuntimeStats()
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="mlx-runtime", daemon=True)
        self._worker.start()

    def resolve(self, name: str) -> Entry:
        entry = self.store.get(self.aliases.get(name, name))
        if entry is None:
            known = ", ".join(e.id for e in self.store.entries()) or "none yet"
            raise ModelNotFoundError(
                f"The model '{name}' does not exist. Available models: {known}. "
                "Convert a model first with `python convert.py <file>`."
            )
        return entry

    def submit(self, entry: Entry, prompt, params: SamplingParams) -> Job:
        job = Job(entry, prompt, params)
        self._jobs.put(job)
        return job

    def preload(self, entry: Entry) -> None:
        """Load a model now (blocking), so the first request does not wait for it."""
        done: queue.Queue = queue.Queue()

        def task() -> None:
            try:
                done.put(self._ensure_loaded(entry))
            except Exception as exc:  # handed back to the caller's thread, raised there
                done.put(exc)

        self._jobs.put(task)
        if isinstance(result := done.get(), Exception):
            raise result

    def status(self) -> dict:
        import mlx.core as mx

        from runtime.hardware import runtime_report

        return {
            **asdict(self.stats),
            "runtime": runtime_report(),
            "model": self.loaded.entry.id if self.loaded else None,
            "layout": self.loaded.layout if self.loaded else None,
            "memory_bytes": mx.get_active_memory(),
            "peak_memory_bytes": mx.get_peak_memory(),
        }

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=10)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if callable(job):
                job()
            else:
                self._run(job)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client left while it waited in the queue
            job.events.put(Finished("cancelled", 0, 0))
            return
        try:
            loaded = self._ensure_loaded(job.entry)
            plan, cache = self._plan(loaded, job)
            job.events.put(Started(len(plan.prompt), plan.budget, plan.cached))
            self._generate(loaded, job, plan, cache)
            self.prompt_cache.store(loaded.cache_key, plan.prompt + plan.sampled, cache)
        except ImpetusError as exc:
            job.events.put(Failed(exc))
        except Exception as exc:
            log.exception("generation failed")
            job.events.put(Failed(exc))

    def _plan(self, loaded: LoadedModel, job: Job) -> tuple[Plan, list]:
        tokens = job.prompt.tokens(loaded.tokenizer, loaded.dialect)
        budget = token_budget(len(tokens), job.params.max_tokens, loaded.context_length)
        cache, cached = self.prompt_cache.fetch(loaded.cache_key, loaded.model, tokens)
        parser = parser_for(loaded, job.prompt, job.params, tokens)
        processors = processors_for(loaded, job.prompt, job.params, len(tokens) - cached)
        return Plan(tokens, cached, budget, job.params, parser, processors), cache

    def _generate(self, loaded: LoadedModel, job: Job, plan: Plan, cache: list) -> None:
        self.stats.state = "generating"
        started = time.perf_counter()
        try:
            for event in generate(loaded.model, loaded.tokenizer, plan, cache, job.cancelled):
                job.events.put(event)
        finally:
            self.stats.state = "idle"
        self.stats.record(event, time.perf_counter() - started)

    def _ensure_loaded(self, entry: Entry) -> LoadedModel:
        if self.loaded and self.loaded.entry.key == entry.key:
            return self.loaded
        self.loaded = None  # drop the old model before loading the next: one resident model
        self.stats.state = "loading"
        try:
            self.loaded = load(entry, self.store.checkpoint_path(entry))
            self.prompt_cache.restore(self.loaded.cache_key)
        finally:
            self.stats.state = "idle"
        return self.loaded


def load(entry: Entry, path: Path) -> LoadedModel:
    from mlx_lm import load as mlx_load

    log.info("loading %s from %s", entry.id, path)
    try:
        model, tokenizer = mlx_load(str(path))
    except Exception as exc:  # mlx-lm raises plain ValueError/FileNotFoundError etc.
        raise ModelLoadError(f"could not load '{entry.id}' from {path}: {exc}; try converting it again") from exc
    if prefers_fp32_weights(entry.parameters):
        return LoadedModel(entry, as_float32(model), tokenizer, dialect_for(tokenizer), layout="float32")
    return LoadedModel(entry, model, tokenizer, dialect_for(tokenizer))


def as_float32(model):
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    log.info("running in float32 on the CPU with OpenBLAS (faster here than quantised kernels)")
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model
