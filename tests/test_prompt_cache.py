"""The prefix KV cache files each entry under exactly the tokens it holds, and survives a restart."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load

from converters.pipeline import ensure_converted
from runtime.prompt_cache import PromptCache
from tests.tiny_models import ARCHS, Q, build_model, write_gguf

TOKENS = [1, 40, 77, 200, 259, 3, 150, 261]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    arch = ARCHS["llama"]
    source = write_gguf(build_model(arch), arch, folder / "tiny.gguf", Q.F32)
    from cache.store import ModelStore

    model, _ = load(str(ensure_converted(source, ModelStore(folder / "home")).path))
    return model


def filled(prompt_cache: PromptCache, model, tokens: list[int]) -> list:
    cache, _ = prompt_cache.fetch("m", model, tokens)
    mx.eval(model(mx.array([tokens]), cache=cache))
    return cache


def test_a_cache_that_saw_one_token_more_is_trimmed_to_its_key(tiny_model):
    prompt_cache = PromptCache(None, max_bytes=1 << 30)
    cache = filled(prompt_cache, tiny_model, TOKENS)  # the model saw all 8 tokens...
    prompt_cache.store("m", TOKENS[:7], cache)  # ...but only 7 were recorded

    reused, cached = prompt_cache.fetch("m", tiny_model, TOKENS[:7] + [99])

    assert cached == 7 and reused[0].offset == 7


def test_a_key_longer_than_the_cache_is_cut_to_it(tiny_model):
    prompt_cache = PromptCache(None, max_bytes=1 << 30)
    cache = filled(prompt_cache, tiny_model, TOKENS[:5])
    prompt_cache.store("m", TOKENS, cache)

    reused, cached = prompt_cache.fetch("m", tiny_model, TOKENS + [99])

    assert cached == 5 and reused[0].offset == 5


def test_reused_prefix_gives_the_same_logits_as_a_fresh_prefill(tiny_model):
    prompt_cache = PromptCache(None, max_bytes=1 << 30)
    prompt_cache.store("m", TOKENS, filled(prompt_cache, tiny_model, TOKENS))
    follow_up = TOKENS + [12, 34, 56]

    reused, cached = prompt_cache.fetch("m", tiny_model, follow_up)
    from_cache = tiny_model(mx.array([follow_up[cached:]]), cache=reused)[0, -1]
    fresh = tiny_model(mx.array([follow_up]))[0, -1]

    assert cached == len(TOKENS)
    assert mx.abs(from_cache - fresh).max().item() < 1e-4


def test_entries_persist_for_a_new_process_once_flushed(tiny_model, tmp_path):
    first = PromptCache(tmp_path, max_bytes=1 << 30)
    first.store("m", TOKENS, filled(first, tiny_model, TOKENS))
    assert PromptCache(tmp_path, max_bytes=1 << 30).restore("m") == 0  # not written while answering
    first.flush()

    restarted = PromptCache(tmp_path, max_bytes=1 << 30)
    assert restarted.restore("m") == 1
    reused, cached = restarted.fetch("m", tiny_model, TOKENS + [5])
    assert cached == len(TOKENS) and reused[0].offset == len(TOKENS)


def test_a_flush_writes_only_the_newest_entries_it_keeps(tiny_model, tmp_path):
    first = PromptCache(tmp_path, max_bytes=1 << 30, persisted=2)
    prompts = [TOKENS, [7, *TOKENS], [9, *TOKENS]]
    for tokens in prompts:
        first.store("m", tokens, filled(first, tiny_model, tokens))
    first.flush()

    restarted = PromptCache(tmp_path, max_bytes=1 << 30)
    assert restarted.restore("m") == 2
    assert [restarted.fetch("m", tiny_model, [*tokens, 5])[1] for tokens in prompts] == [0, 9, 9]
