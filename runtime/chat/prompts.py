"""Turning a request's messages or text into prompt tokens with the model's own tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from errors import PromptError
from runtime.chat.tools import ToolDialect, render_messages


@dataclass(frozen=True)
class ChatPrompt:
    messages: list[dict]
    tools: list[dict] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True

    def offered_tools(self) -> list[dict]:
        """The tools the model may call for this request."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice.get("function", {}).get("name")
            return [t for t in self.tools if t.get("function", t).get("name") == name]
        return self.tools

    @property
    def must_call(self) -> bool:
        return bool(self.offered_tools()) and (self.tool_choice == "required" or isinstance(self.tool_choice, dict))

    def text(self, tokenizer, dialect: ToolDialect) -> str:
        messages, tools = render_messages(self.messages, self.offered_tools() or None, dialect)
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises template errors of its own kinds
            raise PromptError(f"the model's chat template rejected these messages: {exc}") from exc

    def tokens(self, tokenizer, dialect: ToolDialect) -> list[int]:
        # The rendered template already holds any BOS token the model wants.
        return tokenizer.encode(self.text(tokenizer, dialect), add_special_tokens=False)


@dataclass(frozen=True)
class TextPrompt:
    text: str
    tools = None
    must_call = False

    def offered_tools(self) -> list[dict]:
        return []

    def tokens(self, tokenizer, dialect: ToolDialect) -> list[int]:
        return tokenizer.encode(self.text)
