"""Splits generated text into content, reasoning and tool calls, as the model's markers say.

Text is released only once it cannot be part of a marker or a stop string, so nothing of a
`<tool_call>` ever leaks into content. A tool block that cannot be read is returned as text,
never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.generate import TextStateMachine

from runtime.chat.tools import ToolCall, ToolDialect, parse_calls

CONTENT, REASONING, TOOL = "normal", "reasoning", "tool"


@dataclass(frozen=True)
class Delta:
    text: str
    channel: str = "content"  # content | reasoning


@dataclass(frozen=True)
class ToolCalls:
    calls: list[ToolCall]


@dataclass(frozen=True)
class Markers:
    think: tuple[str, str] | None = None
    dialect: ToolDialect | None = None  # None: the request has no tools, so no parsing
    tools: tuple = ()
    stop: tuple[str, ...] = ()


def transitions(markers: Markers) -> dict:
    edges: dict[str, list] = {CONTENT: []}
    if markers.think:
        edges[CONTENT].append((markers.think[0], REASONING))
        edges[REASONING] = [(markers.think[1], CONTENT)]
    if markers.dialect:
        edges[CONTENT].append((markers.dialect.start, TOOL))
        edges[TOOL] = [(markers.dialect.end, CONTENT)] if markers.dialect.end else []
    for state in list(edges):
        edges[state] += [(stop, None) for stop in markers.stop if stop]
    return edges


class OutputParser:
    def __init__(self, markers: Markers, starts_in_reasoning: bool = False):
        self.markers = markers
        initial = REASONING if starts_in_reasoning else CONTENT
        self._state = TextStateMachine(transitions(markers)).make_state(initial)
        self._tool_text = ""
        self._shown = ""
        self._space = ""  # whitespace kept back: dropped if it only separates tool calls
        self._held = ""  # content that may be an unwrapped JSON tool call, decided at the end
        self.made_calls = False

    @property
    def stopped(self) -> bool:
        """A stop string was met."""
        return self._state[0] is None

    def feed(self, text: str) -> list:
        self._state, segments = TextStateMachine.split(self._state, text)
        events = []
        for position, (state, piece) in enumerate(segments):
            events += self._segment(state, piece, closed=position < len(segments) - 1)
        return events

    def finish(self) -> list:
        state, events = self._state[0], []
        if state is not None:
            self._state, pending, _ = TextStateMachine.flush(self._state)
            events += self._segment(state, pending, closed=False)
        if self._tool_text or state == TOOL:
            events += self._close_tool()
        events += self._release_held()
        space, self._space = self._space, ""
        return events + ([Delta(space)] if space and not self.made_calls else [])

    def _segment(self, state: str | None, piece: str, closed: bool) -> list:
        if state == TOOL:
            self._tool_text += piece
            return self._close_tool() if closed else []
        if state == REASONING:
            return [Delta(piece, "reasoning")] if piece else []
        return self._content(piece) if state == CONTENT else []

    def _content(self, piece: str) -> list:
        piece = self._space + piece
        body = piece.rstrip()
        piece, self._space = body, piece[len(body) :]
        if not piece:
            return []
        if self._may_be_bare_call(piece):
            self._held += piece
            return []
        self._shown += piece
        return [Delta(piece)]

    def _may_be_bare_call(self, piece: str) -> bool:
        if not self.markers.dialect:
            return False
        return bool(self._held) or (not self._shown.strip() and piece.lstrip()[:1] in ("{", "["))

    def _close_tool(self) -> list:
        text, self._tool_text = self._tool_text, ""
        return self._calls_or_text(text, f"{self.markers.dialect.start}{text}{self.markers.dialect.end}")

    def _release_held(self) -> list:
        held, self._held = self._held, ""
        return self._calls_or_text(held, held) if held else []

    def _calls_or_text(self, text: str, as_text: str) -> list:
        calls = parse_calls(text, self.markers.dialect, list(self.markers.tools))
        if calls is None:
            self._shown += as_text
            return [Delta(as_text)]
        self.made_calls = True
        return [ToolCalls(calls)]
