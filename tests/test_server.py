"""A real `python -m api` process on a free loopback port, driven by the official openai SDK."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": [{"type": "text", "text": "Tell me a long story about a dragon."}]}]


def test_models_list_has_the_served_model(client, model_id):
    models = {m.id: m for m in client.models.list()}
    assert model_id in models
    assert models[model_id].owned_by == "impetus"


def test_chat_non_stream_answers_with_usage(client, model_id):
    reply = client.chat.completions.create(model=model_id, messages=CAPITAL, temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_usage_matches_streamed_tokens(client, model_id):
    chunks = list(
        client.chat.completions.create(
            model=model_id, messages=STORY, temperature=0, max_tokens=6, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert finishes == ["length"]
    assert usage.completion_tokens == 6 and 1 <= len(content) <= 6
    unstreamed = client.chat.completions.create(model=model_id, messages=STORY, temperature=0, max_tokens=6)
    assert usage.prompt_tokens == unstreamed.usage.prompt_tokens
    assert "".join(content) == unstreamed.choices[0].message.content


def test_completions_continue_the_prompt(client, model_id):
    reply = client.completions.create(model=model_id, prompt="The capital of France is", temperature=0, max_tokens=4)
    assert "Paris" in reply.choices[0].text
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"


def test_no_max_tokens_means_the_rest_of_the_context(server, model_id):
    # Greedy on this prompt ends by itself; a small default cap would cut it at 'length'.
    reply = httpx.post(f"{server}/v1/chat/completions", json={"model": model_id, "messages": CAPITAL, "temperature": 0}, timeout=300)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "stop"


def test_malformed_body_is_a_400_envelope(client, server, model_id):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id, messages=[{"role": "wizard", "content": "hi"}])
    assert raised.value.status_code == 400
    assert raised.value.body["type"] == "invalid_request_error"
    assert raised.value.body["param"].startswith("messages")

    broken = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_unknown_model_is_a_404_envelope(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=CAPITAL)
    assert raised.value.body["code"] == "model_not_found"
    assert "no-such-model" in raised.value.body["message"]


def test_prompt_over_the_context_is_context_length_exceeded(client, model_id):
    huge = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id, messages=huge, max_tokens=5)
    assert raised.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in raised.value.body["message"]


def test_server_still_serves_after_errors(client, model_id):
    reply = client.chat.completions.create(model=model_id, messages=CAPITAL, temperature=0, max_tokens=24)
    assert "Paris" in reply.choices[0].message.content


def test_status_reports_the_loaded_model_and_last_speed(server, model_id, client):
    client.chat.completions.create(model=model_id, messages=CAPITAL, temperature=0, max_tokens=4)
    status = httpx.get(f"{server}/api/models/status").json()
    assert status["model"] == model_id and status["state"] == "idle"
    assert status["last_tokens_per_second"] > 0 and status["memory_bytes"] > 0
    assert status["announced_requests"] == 0  # every request before, refused ones included, has settled


def test_switch_to_unknown_model_is_404_and_keeps_the_loaded_one(server, model_id):
    reply = httpx.post(f"{server}/api/models/switch", json={"model": "no-such-model"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    listed = httpx.get(f"{server}/api/models/list").json()["data"]
    assert [m["id"] for m in listed if m["loaded"]] == [model_id]


def test_switch_to_the_cached_model_loads_it(server, model_id):
    reply = httpx.post(f"{server}/api/models/switch", json={"model": model_id}, timeout=120)
    assert reply.status_code == 200 and reply.json()["model"] == model_id


QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello to Ada."]


def test_concurrent_clients_get_the_greedy_answers_they_get_alone(server, client, model_id):
    def ask(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        return client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=12).choices[0].message.content

    alone = [ask(q) for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))

    assert together == alone and len(set(alone)) == len(QUESTIONS)
    assert httpx.get(f"{server}/api/models/status").json()["most_decoding_sequences"] >= 2
