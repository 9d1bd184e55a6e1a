"""Reading tool calls, reasoning and stop strings out of recorded model outputs of several families."""

from __future__ import annotations

import importlib
import json

import pytest

from runtime.chat.output import Delta, Markers, OutputParser, ToolCalls
from runtime.chat.tools import HERMES, ToolDialect

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
WRITE = {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object"}}}
TOOLS = (WEATHER, WRITE)


def mlx_lm_dialect(module: str) -> ToolDialect:
    parser = importlib.import_module(f"mlx_lm.tool_parsers.{module}")
    json_calls = module == "json_tools"
    return ToolDialect(parser.tool_call_start, parser.tool_call_end, parser.parse_tool_call, True, json_calls)


def parse(chunks: list[str], dialect=HERMES, **markers) -> list:
    parser = OutputParser(Markers(dialect=dialect, tools=TOOLS, **markers))
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.finish()


def calls(events) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for e in events if isinstance(e, ToolCalls) for c in e.calls]


def text(events, channel="content") -> str:
    return "".join(e.text for e in events if isinstance(e, Delta) and e.channel == channel)


def test_hermes_call_split_across_chunks_keeps_surrounding_text():
    events = parse(["Let me check.", " <tool", "_call>\n{\"name\": \"get_", "weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"])
    assert calls(events) == [("get_weather", {"city": "Paris"})]
    assert text(events) == "Let me check."
    assert "<tool_call>" not in text(events)


def test_qwen_two_parallel_calls_with_mlx_lm_parser():
    output = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "write_file", "arguments": {"path": "a.txt"}}\n</tool_call>'
    )
    events = parse([output[i : i + 7] for i in range(0, len(output), 7)], dialect=mlx_lm_dialect("json_tools"))
    assert calls(events) == [("get_weather", {"city": "Oslo"}), ("write_file", {"path": "a.txt"})]
    assert text(events) == ""  # the newline between blocks is not content


def test_llama3_bare_json_with_parameters_is_a_call():
    events = parse(['{"name": "get_weather", ', '"parameters": {"city": "Rome"}}'])
    assert calls(events) == [("get_weather", {"city": "Rome"})]


def test_mistral_tool_calls_marker_with_mlx_lm_parser():
    events = parse(["[TOOL_CALLS]", '[{"name": "write_file", "arguments": {"path": "x.py"}}]'], dialect=mlx_lm_dialect("mistral"))
    assert calls(events) == [("write_file", {"path": "x.py"})]


def test_malformed_json_is_repaired():
    events = parse(["<tool_call>{'name': 'get_weather', 'arguments': {'city': 'Lima',},}</tool_call>"])
    assert calls(events) == [("get_weather", {"city": "Lima"})]


def test_unreadable_call_is_returned_as_text_not_dropped():
    events = parse(["<tool_call>call get_weather please</tool_call> ok"])
    assert calls(events) == []
    assert text(events) == "<tool_call>call get_weather please</tool_call> ok"


def test_unknown_tool_name_stays_text():
    events = parse(['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'])
    assert calls(events) == [] and "rm_rf" in text(events)


def test_json_answer_that_is_not_a_call_stays_text():
    events = parse(['{"answer": 42}'])
    assert calls(events) == [] and text(events) == '{"answer": 42}'


def test_without_tools_markers_pass_through_untouched():
    parser = OutputParser(Markers(dialect=None))
    xml = "<write_to_file><path>a</path></write_to_file> <tool_call>{}</tool_call>"
    events = parser.feed(xml) + parser.finish()
    assert text(events) == xml


def test_reasoning_and_stop_strings():
    events = parse(["<think>user wants", " weather</think>Sure", "! END tail"], think=("<think>", "</think>"), stop=("END",))
    assert text(events, "reasoning") == "user wants weather"
    assert text(events) == "Sure! "


@pytest.mark.parametrize("cut", [3, 11, 29])
def test_same_events_whatever_the_chunking(cut):
    output = 'Hi <tool_call>{"name": "write_file", "arguments": {"path": "p"}}</tool_call>'
    events = parse([output[:cut], output[cut:]])
    assert calls(events) == [("write_file", {"path": "p"})] and text(events) == "Hi"
