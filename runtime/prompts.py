"""Turning a request's messages or text into prompt tokens with the model's own tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import PromptError


@dataclass(frozen=True)
class ChatPrompt:
    messages: list[dict]

    def tokens(self, tokenizer) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises template errors of its own kinds
            raise PromptError(f"the model's chat template rejected these messages: {exc}") from exc
        # The rendered template already holds any BOS token the model wants.
        return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class TextPrompt:
    text: str

    def tokens(self, tokenizer) -> list[int]:
        return tokenizer.encode(self.text)
