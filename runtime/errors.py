"""Errors the runtime reports for a request, each safe to show to the client."""

from converters.errors import ImpetusError


class ContextLengthExceededError(ImpetusError):
    def __init__(self, context_length: int, prompt_tokens: int):
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. "
            f"However, your messages resulted in {prompt_tokens} tokens. "
            "Please reduce the length of the messages."
        )


class ModelLoadError(ImpetusError):
    """A cached checkpoint could not be loaded into the runtime."""


class PromptError(ImpetusError):
    """The request's messages or prompt could not be turned into tokens."""


class OutOfMemoryError(ModelLoadError):
    """Not enough memory for a model or a request, even after unloading others."""
