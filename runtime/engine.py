"""The MLX runtime: resident models within a memory budget, each with a running batch, on one thread.

MLX work (loading, generating, unloading) happens on a single thread that owns the models; callers
submit jobs and read their events from a queue, so the HTTP layer never blocks on MLX. Between
steps of the running batches the thread admits whatever was submitted, so a new request joins its
model's batch at the next step, and a request for another model waits only for that model's load.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cache.store import Entry, ModelStore
from errors import ImpetusError, ModelLoadError, ModelNotFoundError, OutOfMemoryError
from hardware import available_memory
from runtime.batching import Batch, BatchLimits, Sequence
from runtime.chat.tools import HERMES, ToolDialect, dialect_for
from runtime.cpu import blas
from runtime.cpu import ops as cpu_ops
from runtime.generation import Failed, Finished, Plan, SamplingParams, token_budget
from runtime.plans import parser_for, processors_for
from runtime.prompt_cache import PromptCache
from runtime.residency import Residency
from runtime.tuning import FLOAT32, Tuner, Tuning, fits_as_float32

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096
# The longest an idle runtime holds a request back for others the HTTP layer has announced, so that
# requests sent together share one prefill instead of the first one's keeping the others waiting.
GATHER_SECONDS = 0.05
SAVE_AFTER_IDLE = 1.0  # seconds without a job before unsaved prompt caches are written


class Announcements:
    """Generation requests that have reached the HTTP layer but not the runtime yet (their bodies are
    still being read and validated)."""

    def __init__(self):
        self._count = 0
        self._lock = threading.Lock()

    def announce(self):
        """Count one more request on its way; returns the call that settles it (once; more calls do nothing)."""
        with self._lock:
            self._count += 1
        settled = []

        def settle() -> None:
            with self._lock:
                if not settled:
                    settled.append(True)
                    self._count -= 1

        return settle

    def count(self) -> int:
        return self._count


@dataclass
class LoadedModel:
    entry: Entry
    model: object
    tokenizer: object
    dialect: ToolDialect
    tuning: Tuning = field(default_factory=Tuning)
    _grammar_tokenizer: object = None

    @property
    def layout(self) -> str:
        return self.tuning.layout

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
            from runtime.chat.constraints import ll_tokenizer

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
    waker: object = None  # called after each event, from the MLX thread: see watch()
    arrived: object = None  # the API layer's asyncio.Event that the waker sets

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, event) -> None:
        self.events.put(event)
        if self.waker is not None:
            self.waker()

    def watch(self, wake) -> None:
        """Have `wake()` called after every event from now on (an event loop's way to wait without a thread)."""
        self.waker = wake


@dataclass
class RuntimeStats:
    state: str = "idle"  # idle | loading | generating
    requests: int = 0
    last_tokens_per_second: float | None = None
    last_prompt_tokens: int | None = None
    active_sequences: int = 0  # admitted and not ended, waiting for a slot included
    decoding_sequences: int = 0  # of which in a decode step now
    most_decoding_sequences: int = 0  # the most ever decoded together

    def record(self, finished: Finished, seconds: float) -> None:
        self.requests += 1
        self.last_prompt_tokens = finished.prompt_tokens
        if finished.completion_tokens and seconds > 0:
            self.last_tokens_per_second = round(finished.completion_tokens / seconds, 2)


class Runtime:
    def __init__(self, store: ModelStore, aliases: dict[str, str] | None = None, prompt_cache: PromptCache | None = None,
                 residency: Residency | None = None, tool_parsers: dict[str, str] | None = None,
                 tuner: Tuner | None = None, limits: BatchLimits | None = None):
        self.store = store
        self.aliases = aliases or {}
        self.prompt_cache = prompt_cache or PromptCache(None, max_bytes=1 << 30)
        self.residency = residency or Residency(budget_bytes=available_memory() // 2)
        self.tool_parsers = tool_parsers or {}
        self.tuner = tuner or Tuner()
        self.limits = limits or BatchLimits()
        self.loaded: LoadedModel | None = None  # the model used last
        self.stats = RuntimeStats()
        self._batches: dict[str, Batch] = {}  # by model key
        self._jobs: queue.Queue = queue.Queue()
        self.announcements = Announcements()
        self.gather_seconds = GATHER_SECONDS
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
        """After unloading: its batch ended, no stale 'last used' model, the cache may evict it, MLX's cache handed back."""
        if self.loaded and self.loaded.entry.key in keys:
            self.loaded = None
        for key in keys:
            if (batch := self._batches.pop(key, None)) is not None:
                self._ended(batch.fail(ModelLoadError("the model was unloaded while generating; send the request again")))
                batch.close()
            self.store.release(key)
        clear_memory()

    def status(self) -> dict:
        import mlx.core as mx

        return {
            **asdict(self.stats),
            "runtime": {"device": str(mx.default_device()), **blas.report(), "cpu_fast_ops": cpu_ops.installed(),
                        "available_memory_bytes": available_memory()},
            "model": self.loaded.entry.id if self.loaded else None,
            "layout": self.loaded.layout if self.loaded else None,
            "tuning": asdict(self.loaded.tuning) if self.loaded else None,
            "batching": asdict(self.limits),
            "announced_requests": self.announcements.count(),
            "resident": self.residency.describe(),
            "resident_budget_bytes": self.residency.budget_bytes,
            "memory_bytes": mx.get_active_memory(),
            "peak_memory_bytes": mx.get_peak_memory(),
        }

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=10)

    def _work(self) -> None:
        while True:
            for item in self._arrivals():
                if item is None:
                    self._end_all()
                    return
                self._handle(item)
            self._step()

    def _arrivals(self) -> list:
        """Everything submitted so far; while nothing is generating, wait for the first (or IDLE), then for
        the requests announced with it."""
        idle = not self.stats.active_sequences
        try:
            items = [self._next_job() if idle else self._jobs.get_nowait()]
        except queue.Empty:
            return [IDLE] if idle else []
        if idle:
            items += self._announced()
        while True:
            try:
                items.append(self._jobs.get_nowait())
            except queue.Empty:
                return items

    def _next_job(self):
        """For an idle runtime: the next job, or queue.Empty when a model is due to expire. Prompt caches go
        to disk once no job has come for SAVE_AFTER_IDLE seconds: written in a step they held back the
        others' tokens, and written as soon as a burst of requests ends, the next burst's first requests."""
        if self.prompt_cache.unsaved():
            expiry = self.residency.next_expiry_in()
            try:
                return self._jobs.get(timeout=SAVE_AFTER_IDLE if expiry is None else min(expiry, SAVE_AFTER_IDLE))
            except queue.Empty:
                self.prompt_cache.flush()
        return self._jobs.get(timeout=self.residency.next_expiry_in())

    def _announced(self) -> list:
        """What arrives while announced requests are pending, for at most `gather_seconds`."""
        items, deadline = [], time.monotonic() + self.gather_seconds
        while self.announcements.count() and (left := deadline - time.monotonic()) > 0:
            try:
                items.append(self._jobs.get(timeout=min(left, 0.002)))
            except queue.Empty:
                pass
        return items

    def _handle(self, item) -> None:
        if item is IDLE:
            self._expire()
        elif callable(item):
            item()
        else:
            self._admit(item)

    def _expire(self) -> None:
        if gone := self.residency.expire():
            log.info("unloaded idle models: %s", ", ".join(gone))
            self._forget(gone)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client left while it waited in the queue
            job.put(Finished("cancelled", 0, 0))
            return
        try:
            loaded = self._ensure_loaded(job.entry)
            plan, cache = self._plan(loaded, job)
            self._batch_for(loaded).admit(job, plan, cache)
        except Exception as exc:
            job.put(Failed(exc if isinstance(exc, ImpetusError) else self._generation_failure(exc)))
            self._release(job)
            return
        self.residency.use(job.entry.key)
        self._count_active()

    def _batch_for(self, loaded: LoadedModel) -> Batch:
        if (batch := self._batches.get(loaded.entry.key)) is None:
            batch = self._batches[loaded.entry.key] = Batch(loaded, self.prompt_cache, self.limits, self.stats.record)
        return batch

    def _step(self) -> None:
        """One step of every model's batch that has work, one model after another."""
        for key, batch in list(self._batches.items()):
            if not len(batch):
                continue
            self.stats.state = "generating"
            try:
                ended = batch.step()
            except Exception as exc:
                ended = batch.fail(self._generation_failure(exc))
                self._batches.pop(key).close()  # its KV caches are in an unknown state
            self._ended(ended)
        self._count_active()

    def _ended(self, sequences: list[Sequence]) -> None:
        for sequence in sequences:
            self.residency.done(sequence.job.entry.key)
            self._release(sequence.job)

    def _release(self, job: Job) -> None:
        """A job's end restarts its model's idle clock; keep_alive 0 unloads it once nothing uses it."""
        self.residency.keep(job.entry.key, job.keep_alive)
        if job.keep_alive == 0:
            self._expire()

    def _count_active(self) -> None:
        self.stats.active_sequences = sum(len(batch) for batch in self._batches.values())
        self.stats.decoding_sequences = sum(batch.decoding() for batch in self._batches.values())
        self.stats.most_decoding_sequences = max(self.stats.most_decoding_sequences, self.stats.decoding_sequences)
        if not self.stats.active_sequences and self.stats.state == "generating":
            self.stats.state = "idle"

    def _end_all(self) -> None:
        for batch in self._batches.values():
            self._ended(batch.fail(ModelLoadError("the server is shutting down")))
            batch.close()
        self._batches.clear()
        self.prompt_cache.flush()

    def _generation_failure(self, exc: Exception) -> Exception:
        if not is_out_of_memory(exc):
            log.exception("generation failed", exc_info=exc)
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
        # A batch hands processors the whole prompt (cached part included) before the sampled tokens.
        processors = processors_for(loaded, job.prompt, job.params, len(tokens))
        return Plan(tokens, cached, budget, job.params, parser, processors), cache

    def _ensure_loaded(self, entry: Entry) -> LoadedModel:
        if (resident := self.residency.get(entry.key)) is not None:
            self.loaded = resident
            return resident
        if evicted := self.residency.make_room(estimated_bytes(entry)):
            log.info("unloaded %s to make room for %s", ", ".join(evicted), entry.id)
            self._forget(evicted)
        previous, self.stats.state = self.stats.state, "loading"
        try:
            loaded, size = self._load_measured(entry)
        finally:
            self.stats.state = previous
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
        return load(entry, self.store.checkpoint_path(entry), self.tool_parsers.get(entry.id), self.tuner)


IDLE = object()  # the worker's wake-up to unload idle models


def clear_memory() -> None:
    import mlx.core as mx

    mx.clear_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and ("alloc" in text or "out of memory" in text))


def estimated_bytes(entry: Entry) -> int:
    """Room to make before loading: a float32 copy's size where the tuner may choose one."""
    return max(entry.size_bytes, entry.parameters * 4) if fits_as_float32(entry.parameters) else entry.size_bytes


def load_checkpoint(entry: Entry, path: Path, native_parser: str | None = None):
    from mlx_lm import load as mlx_load

    try:
        return mlx_load(str(path), tokenizer_config={"tool_parser_type": native_parser} if native_parser else None)
    except Exception as exc:  # mlx-lm raises plain ValueError/FileNotFoundError etc.
        if is_out_of_memory(exc):
            raise OutOfMemoryError(f"not enough memory to load '{entry.id}' ({entry.size_bytes / 1e9:.1f} GB)") from exc
        raise ModelLoadError(f"could not load '{entry.id}' from {path}: {exc}; try converting it again") from exc


def load(entry: Entry, path: Path, tool_parser: str | None = None, tuner: Tuner | None = None) -> LoadedModel:
    log.info("loading %s from %s", entry.id, path)
    if entry.checks and not entry.checks["passed"]:
        log.warning("%s failed its numeric checks at conversion (converted with --allow-bad-weights): its answers "
                    "may be garbage; %s", entry.id, entry.checks)
    cpu_ops.install()
    native_parser = tool_parser if tool_parser not in (None, "hermes") else None
    model, tokenizer = load_checkpoint(entry, path, native_parser)
    model, tuning = (tuner or Tuner()).tune(entry, model, reload=lambda: load_checkpoint(entry, path, native_parser)[0])
    if tuning.layout == FLOAT32:
        log.info("running %s in float32 (%s): %s", entry.id, tuning.reason, tuning.measurements or "")
    dialect = HERMES if tool_parser == "hermes" else dialect_for(tokenizer)
    return LoadedModel(entry, model, tokenizer, dialect, tuning)
