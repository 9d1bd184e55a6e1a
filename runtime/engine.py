"""The MLX runtime: resident models within a memory budget, one generation at a time, on one thread.

MLX work (loading, generating, unloading) happens on a single thread that owns the models; callers
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
from runtime.errors import ModelLoadError, OutOfMemoryError
from runtime.hardware import available_memory, prefers_fp32_weights
from runtime.residency import Residency
from runtime.generation import Failed, Finished, Plan, SamplingParams, Started, generate, token_budget
from runtime.plans import parser_for, processors_for
from runtime.prompt_cache import PromptCache
from runtime.tools import HERMES, ToolDialect, dialect_for

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
    keep_alive: float | None = None  # seconds the model stays loaded after this job; None: default
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
    def __init__(self, store: ModelStore, aliases: dict[str, str] | None = None, prompt_cache: PromptCache | None = None,
                 residency: Residency | None = None, tool_parsers: dict[str, str] | None = None):
        self.store = store
        self.aliases = aliases or {}
        self.prompt_cache = prompt_cache or PromptCache(None, max_bytes=1 << 30)
        self.residency = residency or Residency(budget_bytes=available_memory() // 2)
        self.tool_parsers = tool_parsers or {}
        self.loaded: LoadedModel | None = None  # the model used last
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

    def submit(self, entry: Entry, prompt, params: SamplingParams, keep_alive: float | None = None) -> Job:
        job = Job(entry, prompt, params, keep_alive)
        self._jobs.put(job)
        return job

    def preload(self, entry: Entry, pinned: bool | None = None, keep_alive: float | None = None) -> None:
        """Load a model now (blocking), so the first request does not wait for it."""
        self._call(lambda: self._hold(entry, keep_alive, pinned))

    def set_budget(self, size: int) -> None:
        def apply() -> None:
            self.residency.budget_bytes = size
            if evicted := self.residency.make_room(0):
                self._forget(evicted)

        self._call(apply)

    def unload(self, entry: Entry) -> None:
        self._call(lambda: self._unload(entry.key))

    def _call(self, function):
        """Run `function` on the MLX thread and hand back its result or its exception."""
        done: queue.Queue = queue.Queue()

        def task() -> None:
            try:
                done.put(function())
            except Exception as exc:  # raised again in the caller's thread
                done.put(exc)

        self._jobs.put(task)
        if isinstance(result := done.get(), Exception):
            raise result
        return result

    def _hold(self, entry: Entry, keep_alive: float | None, pinned: bool | None) -> LoadedModel:
        loaded = self._ensure_loaded(entry)
        self.residency.keep(entry.key, keep_alive, pinned)
        return loaded

    def _unload(self, key: str) -> None:
        self.residency.drop(key)
        self._forget([key])

    def _forget(self, keys: list[str]) -> None:
        """After unloading: no stale 'last used' model, the cache may evict them, MLX's cache handed back."""
        if self.loaded and self.loaded.entry.key in keys:
            self.loaded = None
        for key in keys:
            self.store.release(key)
        clear_memory()

    def status(self) -> dict:
        import mlx.core as mx

        from runtime.hardware import runtime_report

        return {
            **asdict(self.stats),
            "runtime": runtime_report(),
            "model": self.loaded.entry.id if self.loaded else None,
            "layout": self.loaded.layout if self.loaded else None,
            "resident": self.residency.describe(),
            "resident_budget_bytes": self.residency.budget_bytes,
            "memory_bytes": mx.get_active_memory(),
            "peak_memory_bytes": mx.get_peak_memory(),
        }

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=10)

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            if job is IDLE:
                self._expire()
            elif callable(job):
                job()
            else:
                self._run(job)

    def _next_job(self):
        try:
            return self._jobs.get(timeout=self.residency.next_expiry_in())
        except queue.Empty:
            return IDLE

    def _expire(self) -> None:
        if gone := self.residency.expire():
            log.info("unloaded idle models: %s", ", ".join(gone))
            self._forget(gone)

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
            job.events.put(Failed(self._generation_failure(exc)))
        self.residency.keep(job.entry.key, job.keep_alive)
        if job.keep_alive == 0:
            self._expire()

    def _generation_failure(self, exc: Exception) -> Exception:
        if not is_out_of_memory(exc):
            log.exception("generation failed")
            return exc
        others = self.residency.evict_others(self.loaded.entry.key if self.loaded else None)
        self._forget(others)
        return OutOfMemoryError(
            f"out of memory while generating; unloaded {len(others)} other model(s). "
            "Retry, shorten the prompt, or use a smaller model"
        )

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
        if (resident := self.residency.get(entry.key)) is not None:
            self.loaded = resident
            return resident
        if evicted := self.residency.make_room(estimated_bytes(entry)):
            log.info("unloaded %s to make room for %s", ", ".join(evicted), entry.id)
            self._forget(evicted)
        self.stats.state = "loading"
        try:
            loaded, size = self._load_measured(entry)
        finally:
            self.stats.state = "idle"
        self.residency.admit(entry.key, loaded, size)
        self.store.mark_in_use(entry.key)  # the cache's size cap must not evict a loaded model
        self.prompt_cache.restore(loaded.cache_key)
        self.loaded = loaded
        return loaded

    def _load_measured(self, entry: Entry) -> tuple[LoadedModel, int]:
        import mlx.core as mx

        before = mx.get_active_memory()
        try:
            loaded = self._load(entry)
        except OutOfMemoryError:
            log.warning("out of memory loading %s: unloading every unpinned model and retrying", entry.id)
            self._forget(self.residency.evict_unpinned())
            loaded = self._load(entry)
        return loaded, max(mx.get_active_memory() - before, 0) or entry.size_bytes

    def _load(self, entry: Entry) -> LoadedModel:
        return load(entry, self.store.checkpoint_path(entry), self.tool_parsers.get(entry.id))


IDLE = object()  # the worker's wake-up to unload idle models


def clear_memory() -> None:
    import mlx.core as mx

    mx.clear_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and ("alloc" in text or "out of memory" in text))


def estimated_bytes(entry: Entry) -> int:
    return entry.parameters * 4 if prefers_fp32_weights(entry.parameters) else entry.size_bytes


def load(entry: Entry, path: Path, tool_parser: str | None = None) -> LoadedModel:
    from mlx_lm import load as mlx_load

    log.info("loading %s from %s", entry.id, path)
    native_parser = tool_parser if tool_parser not in (None, "hermes") else None
    try:
        model, tokenizer = mlx_load(str(path), tokenizer_config={"tool_parser_type": native_parser} if native_parser else None)
    except Exception as exc:  # mlx-lm raises plain ValueError/FileNotFoundError etc.
        if is_out_of_memory(exc):
            raise OutOfMemoryError(f"not enough memory to load '{entry.id}' ({entry.size_bytes / 1e9:.1f} GB)") from exc
        raise ModelLoadError(f"could not load '{entry.id}' from {path}: {exc}; try converting it again") from exc
    dialect = HERMES if tool_parser == "hermes" else dialect_for(tokenizer)
    if prefers_fp32_weights(entry.parameters):
        return LoadedModel(entry, as_float32(model), tokenizer, dialect, layout="float32")
    return LoadedModel(entry, model, tokenizer, dialect)


def as_float32(model):
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    log.info("running in float32 on the CPU with OpenBLAS (faster here than quantised kernels)")
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model
