"""What Cline and other OpenAI clients rely on, against the real SmolLM2 server: tool calls,
structured output, prefix caching, keepalives, cancellation and LM Studio-style model info."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

WRITE_FILE = {
    "type": "function",
    "function": {
        "name": "write_file",
        "description": "Write text to a file",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    },
}
READ_FILE = {
    "type": "function",
    "function": {"name": "read_file", "description": "Read a file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
}
HELLO = [{"role": "user", "content": "Create a file hello.txt containing hi"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_required_tool_choice_gives_a_valid_call(client, model_id):
    reply = client.chat.completions.create(
        model=model_id, messages=HELLO, tools=[WRITE_FILE, READ_FILE], tool_choice="required",
        temperature=0, max_tokens=60, parallel_tool_calls=False,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("write_file", "read_file")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) >= set(PERSON["required"]) - {"name", "age"} | {"path"}


def test_named_tool_choice_calls_that_tool(client, model_id):
    reply = client.chat.completions.create(
        model=model_id, messages=HELLO, tools=[WRITE_FILE, READ_FILE],
        tool_choice={"type": "function", "function": {"name": "read_file"}}, temperature=0, max_tokens=40,
    )
    names = [c.function.name for c in reply.choices[0].message.tool_calls]
    assert names and set(names) == {"read_file"}


def test_streamed_tool_call_accumulates_in_the_sdk(client, model_id):
    with client.chat.completions.stream(
        model=model_id, messages=HELLO, tools=[WRITE_FILE], tool_choice="required", temperature=0,
        max_tokens=60, stream_options={"include_usage": True},
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "write_file"
    assert set(json.loads(call.function.arguments)) == {"path", "content"}
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage.completion_tokens > 0


def test_tool_history_renders_back_through_the_template(client, model_id):
    history = HELLO + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "write_file", "arguments": "{\"path\": \"hello.txt\", \"content\": \"hi\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Wrote 2 bytes to hello.txt"},
    ]
    reply = client.chat.completions.create(model=model_id, messages=history, tools=[WRITE_FILE], temperature=0, max_tokens=12)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 100  # the tool signatures and the call history were rendered


def test_tool_choice_none_never_calls(client, model_id):
    reply = client.chat.completions.create(model=model_id, messages=HELLO, tools=[WRITE_FILE], tool_choice="none",
                                           temperature=0, max_tokens=8)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content


def test_bad_tool_choice_and_n_are_clear_400s(client, model_id):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id, messages=HELLO, tools=[WRITE_FILE],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id, messages=HELLO, n=2)
    assert raised.value.body["param"] == "n" and "n=1" in raised.value.body["message"]


def valid_person(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 12
        and isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 120
    )


def test_json_schema_output_validates_20_of_20_at_temperature_1(client, model_id):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    messages = [{"role": "user", "content": "Invent a person."}]
    texts = [
        client.chat.completions.create(model=model_id, messages=messages, response_format=response_format,
                                       temperature=1.0, seed=run, max_tokens=40).choices[0].message.content
        for run in range(20)
    ]
    assert sum(valid_person(t) for t in texts) == 20, texts


def test_json_object_output_is_an_object(client, model_id):
    reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "List two colours."}],
                                           response_format={"type": "json_object"}, temperature=0, max_tokens=40)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_shared_prefix_is_served_from_the_cache(client, model_id):
    system = f"{uuid.uuid4()}: you are a careful assistant. " + "Answer briefly. " * 40
    first = client.chat.completions.create(model=model_id, temperature=0, max_tokens=4, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}])
    second = client.chat.completions.create(model=model_id, temperature=0, max_tokens=4, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}])
    assert first.usage.prompt_tokens_details.cached_tokens <= 3  # at most the template's "<|im_start|>system\n"
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 12


def sse_lines(server: str, body: dict, limit: int | None = None) -> list[str]:
    lines = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=600) as response:
        assert response.status_code == 200
        for line in filter(None, response.iter_lines()):
            lines.append(line)
            if limit and sum(l.startswith("data:") for l in lines) >= limit:
                break
    return lines


def test_replayed_cline_request_streams_then_shares_its_prefix(server, model_id, cline_request):
    body = {**cline_request, "model": model_id, "max_tokens": 8}
    first = sse_lines(server, body)
    chunks = [json.loads(l[5:]) for l in first if l.startswith("data: {")]
    assert first[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
    assert any(l.startswith(": keepalive") for l in first)  # prefill of ~6k tokens outlasts the interval
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] > 4000 and chunks[-1]["choices"] == []

    follow_up = {**body, "messages": body["messages"] + [{"role": "assistant", "content": "Working on it."},
                                                         {"role": "user", "content": "Go on."}]}
    second = [json.loads(l[5:]) for l in sse_lines(server, follow_up) if l.startswith("data: {")]
    assert second[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 8


def test_client_that_disconnects_stops_its_generation(server, model_id):
    body = {"model": model_id, "stream": True, "max_tokens": 4000, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Write a very long story about the sea."}]}
    before = httpx.get(f"{server}/api/models/status").json()["requests"]
    sse_lines(server, body, limit=4)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = httpx.get(f"{server}/api/models/status").json()
        if status["state"] == "idle" and status["requests"] > before:
            break
        time.sleep(0.5)
    assert status["state"] == "idle" and status["requests"] == before + 1


def test_lm_studio_models_report_context_lengths(server, model_id):
    models = {m["id"]: m for m in httpx.get(f"{server}/api/v0/models").json()["data"]}
    card = models[model_id]
    assert card["max_context_length"] == 8192 and card["loaded_context_length"] == 8192
    assert card["state"] == "loaded" and card["type"] == "llm"
