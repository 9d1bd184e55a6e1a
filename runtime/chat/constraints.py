"""Constrained decoding with llguidance, as an mlx-lm logits processor.

Used for `response_format` (json_object / json_schema) and for `tool_choice` required / named,
where the answer must be a tool call. The mask is computed on the CPU by llguidance and applied
with plain MLX ops, so it works on every MLX backend.
"""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

from errors import PromptError


def ll_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a model's tokenizer (about a second to build: cache it per model)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return llguidance.hf.from_tokenizer(hf, eos_token=sorted(tokenizer.eos_token_ids))


# Compact JSON: no free whitespace for a small model to wander into.
COMPACT = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def json_schema_grammar(schema: dict | None) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema({**(schema or {"type": "object"}), **COMPACT})


def tool_call_grammar(tools: list[dict], start: str, end: str, parallel: bool = True) -> str:
    """`start {"name": ..., "arguments": {...}} end` blocks (one, or more if parallel) for the given tools."""
    options = [call_schema(tool.get("function", tool)) for tool in tools]
    call = json.dumps({**({"anyOf": options} if len(options) > 1 else options[0]), **COMPACT})
    lark = (
        f"start: block{'+' if parallel else ''}\n"
        f"block: {json.dumps(start + chr(10))} call {json.dumps(chr(10) + end)}\n"
        f"call: %json {call}\n"
    )
    return llguidance.LLMatcher.grammar_from_lark(lark)


def call_schema(function: dict) -> dict:
    parameters = function.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


class GrammarProcessor:
    """Masks every token the grammar does not allow next; ends with EOS once the grammar is done."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, prompt_length: int):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise PromptError(f"the requested output format cannot be enforced: {self.matcher.get_error()}")
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        self.prompt_length = prompt_length
        self.consumed = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self._consume(tokens)
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        return masked(logits, self.bitmask)

    def _consume(self, tokens: mx.array) -> None:
        generated = tokens.tolist()[self.prompt_length :] if tokens.size > self.prompt_length else []
        for token in generated[self.consumed :]:
            self.matcher.consume_token(token)
        self.consumed = len(generated)


def masked(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little")[:, : logits.shape[-1]]
    return mx.where(mx.array(bits.astype(bool)), logits, -mx.inf)
