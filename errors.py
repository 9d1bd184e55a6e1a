"""Domain errors of every layer: each message says what went wrong and what to do next.

A bottom module (it imports nothing of ours), so the cache, the converters, the runtime and the API
raise and catch the same types; the API and the CLI turn them into clean messages at their boundary.
"""


class ImpetusError(Exception):
    """A problem with the user's input or environment, safe to show as a one-line message."""


class ConversionError(ImpetusError):
    """A model file or folder could not be converted."""


class UnknownFormatError(ConversionError):
    """No registered format recognises the input."""


class UnsupportedArchitectureError(ConversionError):
    """The input is readable but its architecture is not supported yet."""


class BadWeightsError(ConversionError):
    """A checkpoint's weights hold NaN or infinity, or a probe through the model gives unusable logits."""


class ModelNotFoundError(ImpetusError):
    """A model id is neither cached nor a path to a model."""


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
