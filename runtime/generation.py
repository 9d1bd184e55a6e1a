"""One request's generation with mlx-lm: sampling, stop strings, cancellation, token counts."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.generate import TextStateMachine
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from runtime.errors import ContextLengthExceededError


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


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: Exception


def token_budget(prompt_tokens: int, requested: int | None, context_length: int) -> int:
    """Tokens this request may generate: what it asked for, at most what the context has left."""
    remaining = context_length - prompt_tokens
    if remaining <= 0:
        raise ContextLengthExceededError(context_length, prompt_tokens)
    return remaining if requested is None else min(requested, remaining)


def sampler_for(params: SamplingParams):
    return make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k)


def processors_for(params: SamplingParams):
    return make_logits_processors(
        repetition_penalty=params.repetition_penalty or None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


def stop_matcher(stop: tuple[str, ...]):
    """A text state machine that ends (state None) on any stop string and holds back partial matches."""
    machine = TextStateMachine({"normal": [(s, None) for s in stop if s]})
    return machine.make_state()


def generate(model, tokenizer, prompt: list[int], budget: int, params: SamplingParams, cancelled: threading.Event) -> Iterator:
    """Yield Delta events, then one Finished event."""
    if params.seed is not None:
        mx.random.seed(params.seed)
    state = stop_matcher(params.stop)
    finish, completion = "length", 0
    responses = stream_generate(
        model, tokenizer, mx.array(prompt), max_tokens=budget,
        sampler=sampler_for(params), logits_processors=processors_for(params),
    )
    for response in responses:
        hit_eos = response.finish_reason == "stop"
        completion = response.generation_tokens - (1 if hit_eos else 0)
        state, text, current = TextStateMachine.step(state, response.text)
        if current is None:
            finish = "stop"
        elif response.finish_reason:
            finish = response.finish_reason
            state, pending, _ = TextStateMachine.flush(state)
            text += pending
        if text:
            yield Delta(text)
        if current is None or cancelled.is_set():
            responses.close()
            finish = "cancelled" if cancelled.is_set() else finish
            break
    yield Finished(finish, len(prompt), completion)
