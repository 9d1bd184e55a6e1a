"""Request bodies of the OpenAI-compatible API; unknown fields are ignored, as OpenAI clients expect."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from runtime.generation import SamplingParams
from settings import parse_duration

# Ollama and LM Studio both sample at 0.8 when a client sends no temperature.
DEFAULT_TEMPERATURE = 0.8


def keep_alive_seconds(value):
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError("keep_alive takes seconds or a duration such as '30s', '5m', '1h'") from None


# Seconds; accepts Ollama's forms ("30s", "5m", "1h", a number, negative for ever).
KeepAlive = Annotated[float | None, BeforeValidator(keep_alive_seconds)]


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text", "input_text"]
    text: str


class Message(BaseModel):
    # Extra fields (tool_calls, tool_call_id, name) pass through to the chat template.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part.text for part in self.content)
        if self.role == "developer":
            message["role"] = "system"
        message.setdefault("content", "")
        return message


class StreamOptions(Lenient):
    include_usage: bool = False


class GenerationRequest(Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # Ollama's keep_alive: how long the model stays loaded after this request ("5m", 30, -1).
    keep_alive: KeepAlive = None

    @field_validator("n")
    @classmethod
    def one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported; send one request per choice")
        return value

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def null_means_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def token_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.token_limit(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=stop,
            response_format=self.format_dict(),
        )

    def format_dict(self) -> dict | None:
        return None


class FunctionSpec(Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionSpec


class ToolName(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"] = "function"
    function: ToolName


class JsonSchemaSpec(Lenient):
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def tool_choice_names_a_tool(self):
        if self.tool_choice in (None, "none", "auto"):
            return self
        names = {tool.function.name for tool in self.tools or []}
        if not names:
            raise ValueError(f"tool_choice {self.tool_choice!r} needs a non-empty 'tools' list")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names '{self.tool_choice.function.name}', which is not in 'tools'")
        return self

    def tool_dicts(self) -> list[dict] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def tool_choice_value(self) -> str | dict | None:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def format_dict(self) -> dict | None:
        if self.response_format is None or self.response_format.type == "text":
            return None
        return self.response_format.model_dump(by_alias=True, exclude_none=True)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict]:
        return [message.for_template() for message in self.messages]


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] = Field(description="a string, or a list holding one string")

    @field_validator("prompt")
    @classmethod
    def single_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported")
            return value[0]
        return value


class SwitchRequest(Lenient):
    model: str
    pin: bool | None = None  # pinned models are never unloaded for room or idleness
    keep_alive: KeepAlive = None


class BudgetRequest(Lenient):
    bytes: int = Field(gt=0)
