"""What one request asks of a generation: sampling, budget, events; the batch (runtime/batching.py) runs it."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from errors import ContextLengthExceededError
from runtime.chat.output import Delta, OutputParser, ToolCalls  # noqa: F401  (re-exported event types)


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
    if params.seed is not None and params.temperature > 0:
        return SeededSampler(params)
    return shared_sampler(params.temperature, params.top_p, params.min_p, params.top_k)


@functools.lru_cache(maxsize=64)
def shared_sampler(temperature: float, top_p: float, min_p: float, top_k: int):
    """One sampler object for the same settings: a batch whose sequences share it samples them in one call."""
    return make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)


class SeededSampler:
    """mlx-lm's filters (in make_sampler's order), then a draw from the request's own random key rather
    than the process-wide one: the same seed gives the same sample whatever runs in the batch beside it."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.key = mx.random.key(params.seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        p = self.params
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p != 0.0:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1.0 / p.temperature), key=draw)


def penalties_for(params: SamplingParams) -> list:
    return make_logits_processors(
        repetition_penalty=params.repetition_penalty or None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


def early_finish(parser: OutputParser, cancelled: threading.Event) -> str | None:
    if parser.stopped:
        return "stop"
    return "cancelled" if cancelled.is_set() else None


def final_reason(finish: str, parser: OutputParser) -> str:
    return "tool_calls" if parser.made_calls and finish == "stop" else finish
