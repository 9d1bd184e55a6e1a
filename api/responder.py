"""Turns a runtime job's events into OpenAI responses: one JSON body, or an SSE stream."""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from api.announce import settle
from api.errors import describe_domain_error
from runtime.catalog import ModelRef
from runtime.conversions import Conversions
from runtime.engine import Job
from runtime.generation import Failed, Finished, Started, ToolCalls

KEEPALIVE = ": keepalive\n\n"


async def next_event(job: Job, timeout: float | None = None):
    """The job's next event, or None if none came within `timeout` seconds.

    The MLX thread wakes this event loop itself after each event, so that waiting costs no thread
    hand-off per token (those compete with decoding for the CPU)."""
    arrived = arrival(job)
    while True:
        try:
            return job.events.get_nowait()
        except queue.Empty:
            arrived.clear()
        if not job.events.empty():  # put between the get and the clear: its wake-up may already be spent
            continue
        try:
            await asyncio.wait_for(arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return None


def arrival(job: Job) -> asyncio.Event:
    """An asyncio.Event the job sets (through this loop) whenever it has a new event."""
    if job.arrived is None:
        loop, job.arrived = asyncio.get_running_loop(), asyncio.Event()
        job.watch(lambda: wake(loop, job.arrived))
    return job.arrived


def wake(loop: asyncio.AbstractEventLoop, arrived: asyncio.Event) -> None:
    try:
        loop.call_soon_threadsafe(arrived.set)
    except RuntimeError:  # the loop has closed (server shutting down): no one is left to wake
        pass


async def wait_started(job: Job, timeout: float | None = None) -> Started | None:
    """Started, or the job's error raised here (before any response is sent); None on timeout."""
    event = await next_event(job, timeout)
    if isinstance(event, Failed):
        raise event.error
    return event


def drain(updates: asyncio.Queue) -> dict | None:
    latest = None
    while not updates.empty():
        latest = updates.get_nowait()
    return latest


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def tool_call_dicts(event: ToolCalls, first_index: int) -> list[dict]:
    return [
        {"index": first_index + i, "id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": call.arguments}}
        for i, call in enumerate(event.calls)
    ]


def usage(finished: Finished) -> dict:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }


def finish_reason(finished: Finished) -> str:
    return "stop" if finished.finish_reason == "cancelled" else finished.finish_reason


@dataclass
class Collected:
    """A whole reply gathered from events, for non-stream responses."""
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)

    def add(self, event) -> None:
        if isinstance(event, ToolCalls):
            self.tool_calls += tool_call_dicts(event, len(self.tool_calls))
        elif event.channel == "reasoning":
            self.reasoning.append(event.text)
        else:
            self.content.append(event.text)


class ChatShape:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    opens_with_role = True

    def __init__(self, reasoning_field: str = "reasoning_content"):
        self.reasoning_field = reasoning_field

    def choice(self, reply: Collected, finish: str) -> dict:
        message = {"role": "assistant", "content": "".join(reply.content) or (None if reply.tool_calls else "")}
        if reply.reasoning:
            message[self.reasoning_field] = "".join(reply.reasoning)
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        return {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}

    def delta(self, delta: dict, finish: str | None = None) -> dict:
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def event_delta(self, event, tool_index: int) -> dict:
        if isinstance(event, ToolCalls):
            return self.delta({"tool_calls": tool_call_dicts(event, tool_index)})
        key = self.reasoning_field if event.channel == "reasoning" else "content"
        return self.delta({key: event.text})


class CompletionShape:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    opens_with_role = False

    def choice(self, reply: Collected, finish: str) -> dict:
        return {"index": 0, "text": "".join(reply.content), "finish_reason": finish, "logprobs": None}

    def delta(self, delta: dict, finish: str | None = None) -> dict:
        return {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}

    def event_delta(self, event, tool_index: int) -> dict:
        return self.delta({"content": event.text})


# A stream's headers wait this long for the prompt to be accepted, so that a quick error (e.g. a
# prompt over the context) is a real HTTP status; past it, headers go out and errors come in-stream.
HEADER_WAIT_SECONDS = 1.0


async def respond(ref: ModelRef, conversions: Conversions, submit, responder: "Responder", stream: bool):
    """The HTTP answer: a StreamingResponse, or the whole body as a dict. `submit(entry) -> Job`.

    A model that must be converted first gets a stream at once, kept alive with progress comments."""
    from fastapi.responses import StreamingResponse

    if ref.entry is None:  # converting first takes seconds at least: hold no other request back for it
        settle()
    if ref.entry is None and stream:
        preparing = responder.stream_after(conversions.ensure, ref.source, submit)
        return StreamingResponse(preparing, media_type="text/event-stream")
    entry = ref.entry or await conversions.ensure(ref.source)
    responder.model_id = entry.id
    job = submit(entry)
    settle()
    await wait_started(job, HEADER_WAIT_SECONDS if stream else None)
    if stream:
        return StreamingResponse(responder.stream(job), media_type="text/event-stream")
    return await responder.complete(job)


def progress_comment(update: dict) -> str:
    done, total = update.get("done"), update.get("total")
    amount = f" {done}/{total}" if total else ""
    return f": converting {update.get('stage', '')}{amount}\n\n"


class Responder:
    def __init__(self, shape, model_id: str, include_usage: bool = False, keepalive_seconds: float = 10.0):
        self.shape = shape
        self.model_id = model_id
        self.include_usage = include_usage
        self.keepalive_seconds = keepalive_seconds
        self.id = f"{shape.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def body(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices, **extra}

    async def complete(self, job: Job) -> dict:
        reply = Collected()
        while not isinstance(event := await next_event(job), Finished):
            if isinstance(event, Failed):
                raise event.error
            reply.add(event)
        return self.body(self.shape.object, [self.shape.choice(reply, finish_reason(event))], usage=usage(event))

    def chunk(self, choices: list, **extra) -> str:
        if self.include_usage:
            extra.setdefault("usage", None)
        return sse(self.body(self.shape.chunk_object, choices, **extra))

    async def stream_after(self, ensure, source, submit) -> AsyncIterator[str]:
        """Convert `source` (progress as SSE comments), then stream the job `submit(entry)` makes."""
        updates: asyncio.Queue = asyncio.Queue()
        preparing = asyncio.create_task(ensure(source, updates.put_nowait))
        while not preparing.done():
            await asyncio.wait({preparing}, timeout=self.keepalive_seconds)
            latest = drain(updates)
            yield progress_comment(latest) if latest else KEEPALIVE
        if preparing.exception() is not None:
            yield sse(describe_domain_error(preparing.exception())[1])
            yield sse("[DONE]")
            return
        self.model_id = preparing.result().id
        async for line in self.stream(submit(preparing.result())):
            yield line

    async def stream(self, job: Job) -> AsyncIterator[str]:
        try:
            async for line in self._stream(job):
                yield line
        finally:
            job.cancel()  # a client that went away stops its generation

    async def _events(self, job: Job):
        """The job's events, with None for each keepalive interval without one."""
        while True:
            event = await next_event(job, self.keepalive_seconds)
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    async def _stream(self, job: Job) -> AsyncIterator[str]:
        if self.shape.opens_with_role:
            yield self.chunk([self.shape.delta({"role": "assistant", "content": ""})])
        tool_index = 0
        async for event in self._events(job):
            if event is None:
                yield KEEPALIVE
            elif isinstance(event, Failed):
                yield sse(describe_domain_error(event.error)[1])
            elif isinstance(event, Finished):
                yield self.chunk([self.shape.delta({}, finish_reason(event))])
                if self.include_usage:
                    yield self.chunk([], usage=usage(event))
            elif not isinstance(event, Started):
                yield self.chunk([self.shape.event_delta(event, tool_index)])
                tool_index += len(event.calls) if isinstance(event, ToolCalls) else 0
        yield sse("[DONE]")
