"""Tool calling: how tools reach a model's prompt and how its calls are read back.

A model whose chat template renders `tools` uses its own dialect and mlx-lm's parser for it.
A model whose template drops them (SmolLM2's does) gets them in its system prompt in the
Hermes `<tool_call>` JSON format most small instruct models have seen, and is parsed as such.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Callable

import json_repair

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"

HERMES_INSTRUCTIONS = """# Tools

You may call one or more functions to help with the user's request. The functions you can call are
listed, one JSON signature per line, inside <tools></tools>:
<tools>
{signatures}
</tools>

To call a function, answer with a JSON object holding its name and arguments inside
<tool_call></tool_call> tags, one block per call:
<tool_call>
{{"name": "<function-name>", "arguments": {{<arguments as a JSON object>}}}}
</tool_call>"""


@dataclass(frozen=True)
class ToolDialect:
    start: str
    end: str
    parser: Callable | None  # mlx-lm's parse_tool_call(text, tools); None: lenient JSON only
    native: bool  # the chat template renders tools and tool calls itself
    # Calls are `{"name", "arguments"}` JSON between the markers, so a grammar can force them.
    json_calls: bool


HERMES = ToolDialect(HERMES_START, HERMES_END, None, native=False, json_calls=True)


def dialect_for(tokenizer) -> ToolDialect:
    if tokenizer.has_tool_calling and template_renders_tools(tokenizer):
        parser = tokenizer.tool_parser
        json_calls = tokenizer.tool_call_start == HERMES_START and parser.__module__.endswith("json_tools")
        return ToolDialect(tokenizer.tool_call_start, tokenizer.tool_call_end or "", parser, True, json_calls)
    return HERMES


def template_renders_tools(tokenizer) -> bool:
    probe = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "impetus_probe", "description": "probe", "parameters": {"type": "object", "properties": {}}}}
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that cannot take tools at all
        return False
    return "impetus_probe" in with_tools


def signatures(tools: list[dict]) -> str:
    return "\n".join(json.dumps(tool.get("function", tool)) for tool in tools)


def with_tools_in_system_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    instructions = HERMES_INSTRUCTIONS.format(signatures=signatures(tools))
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instructions}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


def as_hermes_text(message: dict) -> dict:
    """History in the Hermes format for templates without tool support."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>"}
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not calls:
        return message
    blocks = [f"{HERMES_START}\n{json.dumps(call_payload(call))}\n{HERMES_END}" for call in calls]
    text = "\n".join(filter(None, [message.get("content") or "", *blocks]))
    return {"role": "assistant", "content": text}


def with_parsed_arguments(message: dict) -> dict:
    """Templates expect tool-call arguments as objects; OpenAI clients send JSON strings."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    return {**message, "tool_calls": [{**call, "function": call_payload(call)} for call in calls]}


def call_payload(call: dict) -> dict:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json_repair.loads(arguments) if arguments.strip() else {}
    return {"name": function.get("name"), "arguments": arguments}


def render_messages(messages: list[dict], tools: list[dict] | None, dialect: ToolDialect) -> tuple[list[dict], list | None]:
    """(messages, tools) to hand to the chat template."""
    if dialect.native:
        return [with_parsed_arguments(m) for m in messages], tools
    rendered = [as_hermes_text(m) for m in messages]
    return (with_tools_in_system_prompt(rendered, tools) if tools else rendered), None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


def parse_calls(text: str, dialect: ToolDialect, tools: list[dict]) -> list[ToolCall] | None:
    """The calls in one tool block, or None if it holds none we can read (the caller keeps it as text)."""
    parsed = _with_model_parser(text, dialect, tools) or lenient_calls(text)
    names = {t.get("function", t).get("name") for t in tools}
    calls = [c for c in parsed if isinstance(c, dict) and c.get("name") in names]
    if not calls or len(calls) != len(parsed):
        return None
    return [ToolCall(f"call_{uuid.uuid4().hex[:24]}", c["name"], arguments_text(c)) for c in calls]


def _with_model_parser(text: str, dialect: ToolDialect, tools: list[dict]) -> list:
    if dialect.parser is None:
        return []
    try:
        parsed = dialect.parser(text, tools)
    except Exception:  # parsers raise assorted errors on malformed calls; the lenient path follows
        return []
    return parsed if isinstance(parsed, list) else [parsed]


def lenient_calls(text: str) -> list:
    """Unwrapped or slightly broken JSON calls: `{...}`, `[{...}, ...]`, single quotes, trailing commas."""
    body = text.strip().removeprefix(HERMES_START).removesuffix(HERMES_END).strip()
    if not body.startswith(("{", "[")):
        return []
    value = json_repair.loads(body)
    calls = value if isinstance(value, list) else [value]
    return [normalised(c) for c in calls if isinstance(c, dict)]


def normalised(call: dict) -> dict:
    if "function" in call and isinstance(call["function"], dict):
        call = call["function"]
    arguments = call.get("arguments", call.get("parameters", {}))
    return {"name": call.get("name"), "arguments": arguments}


def arguments_text(call: dict) -> str:
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json_repair.loads(arguments) if arguments.strip() else {}
    return json.dumps(arguments)
