"""Continuous batching in the real runtime, on a tiny model: a batch gives each request the tokens it
would get alone, a seed stays the request's own, and a cancelled request frees its slot."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import mlx.core as mx
import pytest

from cache.store import ModelStore
from converters.pipeline import ensure_converted
from runtime.batching import Batch, BatchLimits
from runtime.chat.prompts import TextPrompt
from runtime.engine import Job, Runtime, load
from runtime.generation import Delta, Failed, Finished, Plan, SamplingParams, SeededSampler, Started, sampler_for
from runtime.plans import parser_for, processors_for
from runtime.prompt_cache import PromptCache
from runtime.tuning import FLOAT32, Tuner
from tests.tiny_models import ARCHS, Q, build_model, write_gguf

PROMPTS = ["the cat sat", "he said the", "t h e", "hello there, the end of it"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny float32 llama with an 8k context (room for a request that would run a long time)."""
    folder = tmp_path_factory.mktemp("batching")
    arch = ARCHS["llama"]
    source = write_gguf(build_model(arch, seed=3, context=8192), arch, folder / "tiny.gguf", Q.F32)
    store = ModelStore(folder / "home")
    return store, ensure_converted(source, store).entry


@contextlib.contextmanager
def fresh_runtime(store: ModelStore, max_sequences: int = 4, prompt_cache: PromptCache | None = None):
    """A runtime with nothing loaded: the first job's load holds the MLX thread while the rest queue up."""
    runtime = Runtime(store, prompt_cache=prompt_cache, limits=BatchLimits(max_sequences=max_sequences))
    try:
        yield runtime
    finally:
        runtime.close()


@dataclass
class Outcome:
    text: str
    finished: Finished


def outcome(job: Job) -> Outcome:
    pieces = []
    while not isinstance(event := job.events.get(timeout=120), Finished):
        assert not isinstance(event, Failed), event.error
        if isinstance(event, Delta):
            pieces.append(event.text)
    return Outcome("".join(pieces), event)


def outcomes(jobs: list[Job]) -> list[Outcome]:
    """Every job's outcome, each read by its own thread as its events arrive."""
    results: dict[int, Outcome] = {}
    readers = [threading.Thread(target=lambda i=i, job=job: results.update({i: outcome(job)})) for i, job in enumerate(jobs)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=180)
    return [results[i] for i in range(len(jobs))]


def one_at_a_time(store, entry, prompts: list[str], params: SamplingParams) -> list[Outcome]:
    with fresh_runtime(store, max_sequences=1) as runtime:
        return [outcome(runtime.submit(entry, TextPrompt(p), params)) for p in prompts]


def test_a_batch_gives_every_request_the_greedy_tokens_it_gets_alone(tiny):
    store, entry = tiny
    alone = one_at_a_time(store, entry, PROMPTS, GREEDY)
    with fresh_runtime(store, max_sequences=4) as runtime:
        together = outcomes([runtime.submit(entry, TextPrompt(p), GREEDY) for p in PROMPTS])
        most_at_once = runtime.stats.most_decoding_sequences

    assert most_at_once == len(PROMPTS)  # they really were decoded together
    assert [o.text for o in together] == [o.text for o in alone]
    assert [o.finished.completion_tokens for o in together] == [o.finished.completion_tokens for o in alone]
    assert len({o.text for o in together}) == len(PROMPTS)  # different prompts, different answers


def test_more_requests_than_slots_wait_and_still_get_their_own_tokens(tiny):
    store, entry = tiny
    prompts = PROMPTS * 2
    alone = one_at_a_time(store, entry, PROMPTS, GREEDY)
    with fresh_runtime(store, max_sequences=3) as runtime:
        together = outcomes([runtime.submit(entry, TextPrompt(p), GREEDY) for p in prompts])
        most_at_once = runtime.stats.most_decoding_sequences

    assert most_at_once == 3
    assert [o.text for o in together] == [o.text for o in alone * 2]


def test_a_seed_gives_the_same_sample_beside_other_requests(tiny):
    store, entry = tiny
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=11)
    (alone,) = one_at_a_time(store, entry, PROMPTS[:1], seeded)
    with fresh_runtime(store) as runtime:
        unseeded = SamplingParams(max_tokens=16, temperature=1.0)
        jobs = [runtime.submit(entry, TextPrompt(PROMPTS[0]), seeded), runtime.submit(entry, TextPrompt(PROMPTS[1]), unseeded),
                runtime.submit(entry, TextPrompt(PROMPTS[0]), seeded)]
        first, _, second = outcomes(jobs)

    assert first.text == second.text == alone.text
    other_seed = one_at_a_time(store, entry, PROMPTS[:1], SamplingParams(max_tokens=16, temperature=1.0, seed=12))
    assert other_seed[0].text != alone.text


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(tiny):
    store, entry = tiny
    with fresh_runtime(store, max_sequences=1) as runtime:
        long = runtime.submit(entry, TextPrompt(PROMPTS[0]), SamplingParams(max_tokens=200, temperature=0.0))
        waiting = runtime.submit(entry, TextPrompt(PROMPTS[1]), SamplingParams(max_tokens=8, temperature=0.0))
        early = texts_until(long, 5)  # `long` holds the only slot for ~200 steps; we read as it decodes
        waited = [type(e).__name__ for e in drain(waiting)]
        status = runtime.status()
        long.cancel()
        cancelled, served = outcome(long), outcome(waiting)

    assert len(early) == 5 and waited in ([], ["Started"])  # no token for `waiting` while `long` ran
    assert (status["active_sequences"], status["decoding_sequences"]) == (2, 1)
    assert cancelled.finished.finish_reason == "cancelled" and cancelled.finished.completion_tokens < 200
    assert served.finished.completion_tokens == 8


def texts_until(job: Job, count: int) -> list[str]:
    texts = []
    while len(texts) < count:
        event = job.events.get(timeout=60)
        assert not isinstance(event, (Failed, Finished)), event
        if isinstance(event, Delta):
            texts.append(event.text)
    return texts


def drain(job: Job) -> list:
    """The events a job has now, put back so that `outcome` still sees them."""
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    for event in events:
        job.events.put(event)
    return events


def test_requests_with_the_same_settings_share_a_sampler_so_the_batch_samples_them_in_one_call():
    sampling = SamplingParams(temperature=0.7, top_p=0.9)
    assert sampler_for(sampling) is sampler_for(SamplingParams(temperature=0.7, top_p=0.9, max_tokens=5))
    assert sampler_for(sampling) is not sampler_for(SamplingParams(temperature=0.8, top_p=0.9))
    # A seeded request draws from its own key, so it keeps a sampler of its own.
    seeded = SamplingParams(temperature=0.7, seed=3)
    assert isinstance(sampler_for(seeded), SeededSampler) and sampler_for(seeded) is not sampler_for(seeded)


def test_an_idle_runtime_holds_a_request_for_announced_ones_and_admits_them_together(tiny):
    store, entry = tiny
    with fresh_runtime(store) as runtime:
        outcome(runtime.submit(entry, TextPrompt("warm up"), SamplingParams(max_tokens=1)))  # loaded and idle
        runtime.gather_seconds = 30.0
        settle = runtime.announcements.announce()  # a second request is still being read
        first = runtime.submit(entry, TextPrompt(PROMPTS[0]), GREEDY)
        time.sleep(0.5)
        assert first.events.empty()  # held back for the announced one
        second = runtime.submit(entry, TextPrompt(PROMPTS[1]), GREEDY)
        settle()
        together = outcomes([first, second])
        assert runtime.stats.most_decoding_sequences == 2
    assert all(o.finished.completion_tokens for o in together)


def test_an_announcement_that_never_arrives_delays_a_request_by_the_gathering_limit_at_most(tiny):
    store, entry = tiny
    with fresh_runtime(store) as runtime:
        outcome(runtime.submit(entry, TextPrompt("warm up"), SamplingParams(max_tokens=1)))
        runtime.gather_seconds = 0.3
        runtime.announcements.announce()  # never settled
        started = time.monotonic()
        job = runtime.submit(entry, TextPrompt(PROMPTS[0]), GREEDY)
        assert isinstance(job.events.get(timeout=60), Started)
        waited = time.monotonic() - started
    assert 0.3 <= waited < 10


def test_an_ended_requests_cache_reaches_the_disk_once_the_runtime_is_idle(tiny, tmp_path):
    store, entry = tiny
    folder = tmp_path / "prompt-cache"
    with fresh_runtime(store, prompt_cache=PromptCache(folder, max_bytes=1 << 30)) as runtime:
        first = outcome(runtime.submit(entry, TextPrompt(PROMPTS[3]), GREEDY))
        deadline = time.monotonic() + 30
        while not list(folder.rglob("*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(folder.rglob("*.safetensors"))) == 1  # while the runtime still runs, idle

    with fresh_runtime(store, prompt_cache=PromptCache(folder, max_bytes=1 << 30)) as restarted:
        again = outcome(restarted.submit(entry, TextPrompt(PROMPTS[3]), GREEDY))
    assert first.finished.cached_tokens == 0
    assert again.finished.cached_tokens == again.finished.prompt_tokens - 1  # the model still sees one
    assert again.text == first.text


def planned(loaded, prompt_cache: PromptCache, entry, text: str) -> tuple[Job, Plan, list]:
    """A job and its plan, made as the runtime makes them."""
    job, prompt = Job(entry, TextPrompt(text), GREEDY), TextPrompt(text)
    tokens = prompt.tokens(loaded.tokenizer, loaded.dialect)
    cache, cached = prompt_cache.fetch(loaded.cache_key, loaded.model, tokens)
    plan = Plan(tokens, cached, 6, GREEDY, parser_for(loaded, prompt, GREEDY, tokens),
                processors_for(loaded, prompt, GREEDY, len(tokens)))
    return job, plan, cache


def test_a_cached_prompt_waits_a_step_to_start_decoding_together_with_a_prompt_being_prefilled(tiny):
    store, entry = tiny
    loaded = load(entry, store.checkpoint_path(entry), tuner=Tuner(None, layout=FLOAT32, threads=1))
    prompt_cache = PromptCache(None, max_bytes=1 << 30)
    _, seen, cache = planned(loaded, prompt_cache, entry, PROMPTS[0])
    mx.eval(loaded.model(mx.array([seen.prompt]), cache=cache))
    prompt_cache.store(loaded.cache_key, seen.prompt, cache)

    batch = Batch(loaded, prompt_cache, BatchLimits(), record=lambda *_: None)
    cached, fresh = planned(loaded, prompt_cache, entry, PROMPTS[0]), planned(loaded, prompt_cache, entry, PROMPTS[3])
    assert cached[1].cached == len(cached[1].prompt) - 1 and fresh[1].cached == 0
    for job, plan, cache in (cached, fresh):
        batch.admit(job, plan, cache)

    decoding = []
    while len(batch):
        batch.step()
        decoding.append(batch.decoding())
    assert decoding[:3] == [0, 0, 2]  # the fresh prompt's prefill, both starts in one pass, both first tokens
    alone = one_at_a_time(store, entry, [PROMPTS[0], PROMPTS[3]], SamplingParams(max_tokens=6, temperature=0.0))
    assert [outcome(job).text for job in (cached[0], fresh[0])] == [o.text for o in alone]
