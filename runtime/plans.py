"""What a request needs beyond its tokens: output markers to parse, constraints to enforce."""

from __future__ import annotations

from runtime.chat.constraints import GrammarProcessor, json_schema_grammar, tool_call_grammar
from runtime.chat.output import Markers, OutputParser
from runtime.generation import SamplingParams, penalties_for


def markers_for(loaded, prompt, params: SamplingParams) -> Markers:
    tokenizer, tools = loaded.tokenizer, prompt.offered_tools()
    think = (tokenizer.think_start, tokenizer.think_end) if tokenizer.has_thinking else None
    return Markers(think=think, dialect=loaded.dialect if tools else None, tools=tuple(tools), stop=params.stop)


def parser_for(loaded, prompt, params: SamplingParams, tokens: list[int]) -> OutputParser:
    markers = markers_for(loaded, prompt, params)
    return OutputParser(markers, starts_in_reasoning=opens_reasoning(loaded.tokenizer, tokens, markers))


def opens_reasoning(tokenizer, tokens: list[int], markers: Markers) -> bool:
    """Templates of thinking models may end the prompt inside `<think>`."""
    if not markers.think:
        return False
    tail = tokenizer.decode(tokens[-8:]).rstrip()
    return tail.endswith(markers.think[0])


def grammar_for(loaded, prompt, params: SamplingParams) -> str | None:
    response_format = params.response_format or {}
    if response_format.get("type") == "json_object":
        return json_schema_grammar(None)
    if response_format.get("type") == "json_schema":
        return json_schema_grammar(response_format.get("json_schema", {}).get("schema"))
    if prompt.must_call and loaded.dialect.json_calls:
        dialect = loaded.dialect
        return tool_call_grammar(prompt.offered_tools(), dialect.start, dialect.end, prompt.parallel_tool_calls)
    return None


def processors_for(loaded, prompt, params: SamplingParams, fed_tokens: int) -> list:
    """Penalties, then the grammar mask last so nothing re-enables a forbidden token."""
    processors = penalties_for(params)
    if grammar := grammar_for(loaded, prompt, params):
        processors.append(GrammarProcessor(loaded.grammar_tokenizer(), grammar, fed_tokens))
    return processors
