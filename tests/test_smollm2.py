"""The real SmolLM2-135M-Instruct Q4_1 GGUF, converted and run in-process."""

from __future__ import annotations

import pytest
from mlx_lm.utils import load_tokenizer
from transformers import AutoTokenizer

from cache.store import ModelStore
from runtime.chat.prompts import ChatPrompt
from runtime.engine import Runtime
from runtime.generation import Delta, Failed, Finished, SamplingParams

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "Impetus converts any local model file into MLX once, then serves it through an "
    "OpenAI-compatible API. It's 2026: über-fast, naïve tokenisers beware! Numbers like 3.14159, "
    "e-mail@example.com, <tags> and    odd   spacing\n\tshould all round-trip exactly."
)
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def runtime(smollm2, shared_home):
    runtime = Runtime(ModelStore(shared_home))
    yield runtime
    runtime.close()


def run(runtime: Runtime, entry, messages, **params) -> tuple[str, Finished]:
    job = runtime.submit(entry, ChatPrompt(messages), SamplingParams(**params))
    pieces = []
    while not isinstance(event := job.events.get(timeout=300), Finished):
        assert not isinstance(event, Failed), event
        if isinstance(event, Delta):
            pieces.append(event.text)
    return "".join(pieces), event


@pytest.mark.parametrize("text", [PARAGRAPH, "<|im_start|>user\nHi there<|im_end|>\n"])
def test_tokenizer_ids_match_transformers_gguf_tokenizer(smollm2, smollm2_gguf, text):
    ours = load_tokenizer(smollm2.path)
    theirs = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == text


def test_greedy_answer_names_paris(runtime, smollm2):
    text, finished = run(runtime, smollm2.entry, CAPITAL, temperature=0.0, max_tokens=24)
    assert "Paris" in text
    assert finished.finish_reason == "stop"  # it ended on <|im_end|>, not on the token limit


def test_stop_string_ends_generation_before_it(runtime, smollm2):
    text, finished = run(runtime, smollm2.entry, CAPITAL, temperature=0.0, max_tokens=24, stop=("Paris",))
    assert "Paris" not in text and text.startswith("The capital")
    assert finished.finish_reason == "stop"


def test_same_seed_same_sample(runtime, smollm2):
    story = [{"role": "user", "content": "Tell me a story."}]
    first, _ = run(runtime, smollm2.entry, story, temperature=1.0, max_tokens=12, seed=7)
    second, _ = run(runtime, smollm2.entry, story, temperature=1.0, max_tokens=12, seed=7)
    assert first == second


def test_follow_up_turns_reuse_the_cache_and_stay_correct(runtime, smollm2):
    """The cached prefix must hold exactly the tokens it is filed under, EOS of the last reply included."""
    first_text, first = run(runtime, smollm2.entry, CAPITAL, temperature=0.0, max_tokens=24)
    follow_up = CAPITAL + [{"role": "assistant", "content": first_text}, {"role": "user", "content": "What is the capital of France?"}]
    _, again = run(runtime, smollm2.entry, CAPITAL, temperature=0.0, max_tokens=24)
    text, second = run(runtime, smollm2.entry, follow_up, temperature=0.0, max_tokens=24)
    fresh_text, _ = run(Runtime(runtime.store), smollm2.entry, follow_up, temperature=0.0, max_tokens=24)
    assert again.cached_tokens == first.prompt_tokens - 1
    assert second.cached_tokens > first.prompt_tokens
    assert text == fresh_text and "Paris" in text
