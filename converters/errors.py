"""Domain errors: each message says what went wrong and what to do next."""


class ImpetusError(Exception):
    """A problem with the user's input or environment, safe to show as a one-line message."""


class ConversionError(ImpetusError):
    """A model file or folder could not be converted."""


class UnknownFormatError(ConversionError):
    """No registered format recognises the input."""


class UnsupportedArchitectureError(ConversionError):
    """The input is readable but its architecture is not supported yet."""


class ModelNotFoundError(ImpetusError):
    """A model id is neither cached nor a path to a model."""
