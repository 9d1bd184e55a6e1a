"""One request's generation with mlx-lm: sampling, constraints, output parsing, cancellation."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from runtime.errors import ContextLengthExceededError
from runtime.output import Delta, OutputParser, ToolCalls  # noqa: F401  (re-exported event types)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}
    response_format: dict | None = None


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    max_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass
class Plan:
    """Everything decided before the first token: what to feed, how much to write, how to read it."""
    prompt: list[int]
    cached: int
    budget: int
    params: SamplingParams
    parser: OutputParser
    processors: list = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    # Every sampled token, EOS included: the model has seen them all, so the KV cache holds them.
    sampled: list[int] = field(default_factory=list)


def token_budget(prompt_tokens: int, requested: int | None, context_length: int) -> int:
    """Tokens this request may generate: what it asked for, at most what the context has left."""
    remaining = context_length - prompt_tokens
    if remaining <= 0:
        raise ContextLengthExceededError(context_length, prompt_tokens)
    return remaining if requested is None else min(requested, remaining)


def sampler_for(params: SamplingParams):
    return make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k)


def penalties_for(params: SamplingParams) -> list:
    return make_logits_processors(
        repetition_penalty=params.repetition_penalty or None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


def generate(model, tokenizer, plan: Plan, cache: list, cancelled: threading.Event) -> Iterator:
    """Yield Delta / ToolCalls events, then one Finished event."""
    if plan.params.seed is not None:
        mx.random.seed(plan.params.seed)
    responses = stream_generate(
        model, tokenizer, mx.array(plan.prompt[plan.cached :]), max_tokens=plan.budget,
        sampler=sampler_for(plan.params), logits_processors=plan.processors, prompt_cache=cache,
    )
    finish = "length"
    for response in responses:
        plan.sampled.append(response.token)
        if response.finish_reason != "stop":  # mlx-lm reports the EOS token itself with "stop"
            plan.generated.append(response.token)
        yield from plan.parser.feed(response.text)
        finish = early_finish(plan.parser, cancelled) or response.finish_reason or finish
        if early_finish(plan.parser, cancelled):
            responses.close()
            break
    yield from plan.parser.finish()
    yield Finished(final_reason(finish, plan.parser), len(plan.prompt), len(plan.generated), plan.cached)


def early_finish(parser: OutputParser, cancelled: threading.Event) -> str | None:
    if parser.stopped:
        return "stop"
    return "cancelled" if cancelled.is_set() else None


def final_reason(finish: str, parser: OutputParser) -> str:
    return "tool_calls" if parser.made_calls and finish == "stop" else finish
