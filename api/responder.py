"""Turns a runtime job's events into OpenAI responses: one JSON body, or an SSE stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from api.errors import describe_domain_error
from runtime.engine import Job
from runtime.generation import Delta, Failed, Finished, Started


class ChatShape:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    opening_delta = {"role": "assistant", "content": ""}

    @staticmethod
    def choice(text: str, finish: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}

    @staticmethod
    def delta(text: str | None, finish: str | None) -> dict:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}


class CompletionShape:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    opening_delta = None

    @staticmethod
    def choice(text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    @staticmethod
    def delta(text: str | None, finish: str | None) -> dict:
        return CompletionShape.choice(text or "", finish)


async def next_event(job: Job):
    return await asyncio.to_thread(job.events.get)


async def wait_started(job: Job) -> Started:
    """The first event: Started, or the job's error raised here, before any response is sent."""
    event = await next_event(job)
    if isinstance(event, Failed):
        raise event.error
    return event


def usage(finished: Finished) -> dict:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def finish_reason(finished: Finished) -> str:
    return "stop" if finished.finish_reason == "cancelled" else finished.finish_reason


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Responder:
    def __init__(self, shape, model_id: str, include_usage: bool = False):
        self.shape = shape
        self.model_id = model_id
        self.include_usage = include_usage
        self.id = f"{shape.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def body(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices, **extra}

    async def complete(self, job: Job) -> dict:
        text = []
        while not isinstance(event := await next_event(job), Finished):
            if isinstance(event, Failed):
                raise event.error
            text.append(event.text)
        choice = self.shape.choice("".join(text), finish_reason(event))
        return self.body(self.shape.object, [choice], usage=usage(event))

    def chunk(self, choices: list, **extra) -> str:
        if self.include_usage:
            extra.setdefault("usage", None)
        return sse(self.body(self.shape.chunk_object, choices, **extra))

    async def stream(self, job: Job) -> AsyncIterator[str]:
        try:
            async for line in self._stream(job):
                yield line
        finally:
            job.cancel()  # a client that went away stops its generation

    async def _stream(self, job: Job) -> AsyncIterator[str]:
        if self.shape.opening_delta is not None:
            yield self.chunk([{**self.shape.delta(None, None), "delta": self.shape.opening_delta}])
        while not isinstance(event := await next_event(job), (Finished, Failed)):
            yield self.chunk([self.shape.delta(event.text, None)])
        if isinstance(event, Failed):
            yield sse(describe_domain_error(event.error)[1])
        else:
            yield self.chunk([self.shape.delta(None, finish_reason(event))])
            if self.include_usage:
                yield self.chunk([], usage=usage(event))
        yield sse("[DONE]")
