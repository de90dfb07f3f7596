"""The wire protocol of the job API: pydantic models only, no serving logic."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Literal

from jsonschema import Draft202012Validator, SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from core.settings import settings

TaskType = Literal["reasoning", "math", "coding", "chat"]
RuntimeName = Literal["vllm", "ollama", "onnx"]
JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MAX_SCHEMA_BYTES = 32_768


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = Field(max_length=settings.max_prompt_chars, description="JSON, as text.")


class ToolCall(BaseModel):
    """A call the model made, as OpenAI's ``message.tool_calls[]``."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """A chat message, as OpenAI's: a ``tool`` message answers the assistant's tool call
    ``tool_call_id``; an assistant message may carry ``tool_calls`` instead of content."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(None, max_length=settings.max_prompt_chars)
    tool_calls: list[ToolCall] | None = Field(None, min_length=1, max_length=64)
    tool_call_id: str | None = Field(None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content is required (an assistant message may give tool_calls)")
        return self


@functools.lru_cache(maxsize=256)
def schema_problem(schema_json: str) -> str | None:
    """Why a schema is not valid JSON Schema (its ``$schema`` draft, else 2020-12), or None.
    Cached: a batch's rows usually share one schema, and a check costs about 0.4 ms."""
    schema = json.loads(schema_json)
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "its root"
        return f"not a valid JSON Schema: {exc.message} (at {where})"
    return None


def checked_schema(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` if it is a valid JSON Schema of at most ``MAX_SCHEMA_BYTES``; checked on
    submit, so a malformed schema is a 422 now, not a job the backend fails later."""
    text = json.dumps(value, sort_keys=True)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema must be at most {MAX_SCHEMA_BYTES} bytes as JSON")
    if problem := schema_problem(text):
        raise ValueError(problem)
    return value


class JsonSchema(BaseModel):
    """OpenAI's ``response_format.json_schema``: the schema the output must match."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=1024)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return checked_schema(value)


class ResponseFormat(BaseModel):
    """Output constrained to JSON, as OpenAI's ``response_format``: ``json_object`` (any JSON
    object) or ``json_schema`` (matching ``json_schema.schema``); vLLM and Ollama runtimes."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=1024)
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema.")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _valid_parameters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else checked_schema(value)


class Tool(BaseModel):
    """A function the model may call, as OpenAI's ``tools[]``; vLLM and Ollama runtimes."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class JobCreate(BaseModel):
    """A generation to run. Parameters left out come from the task profile."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str | None = Field(None, min_length=1, max_length=settings.max_prompt_chars)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    task_type: TaskType = "chat"
    runtime: RuntimeName | None = Field(None, description="Omitted: the configured default.")
    model: str | None = Field(None, min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=settings.max_tokens_limit)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] | None = Field(None, max_length=8)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Omitted: auto. Ollama takes only auto and none."
    )
    priority: int = Field(5, ge=0, le=9, description="0 lowest, 9 highest.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Echoed back as given.")
    callback_url: HttpUrl | None = Field(
        None,
        max_length=2048,
        description="POSTed the final job, signed (docs/webhooks.md). Must be a public "
        "address unless the server allow-lists it.",
    )

    @property
    def json_output(self) -> ResponseFormat | None:
        """``response_format`` when it asks for JSON; None for free text (``type: text``)."""
        if self.response_format and self.response_format.type != "text":
            return self.response_format
        return None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings_sane(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not s or len(s) > 128 for s in value):
            raise ValueError("each stop string must be 1-128 characters")
        return value

    @property
    def uses_tools(self) -> bool:
        """Tools offered, or a conversation that already holds tool calls or results."""
        return bool(self.tools) or any(
            m.tool_calls or m.role == "tool" for m in self.messages or ()
        )

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> JobCreate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    @model_validator(mode="after")
    def _tool_choice_among_tools(self) -> JobCreate:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("tools: each function needs a name of its own")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools")
        chosen = self.tool_choice
        if isinstance(chosen, NamedToolChoice) and chosen.function.name not in names:
            raise ValueError(f"tool_choice names {chosen.function.name!r}, which is not in tools")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    queue_wait_s: float
    time_to_first_token_s: float | None
    run_s: float
    backend_s: float
    tokens_per_s: float | None


class JobResult(BaseModel):
    text: str
    finish_reason: Literal["stop", "length", "tool_calls", "cancelled"]
    tool_calls: list[ToolCall] | None = Field(
        None, description="The functions the model called (finish_reason tool_calls)."
    )
    reasoning: str | None = Field(
        None,
        description="A reasoning model's thinking, when its server sends it apart from the "
        "answer (vLLM --reasoning-parser, Ollama thinking); not part of text.",
    )
    usage: Usage
    runtime: str
    model: str
    worker: str
    timings: Timings


class JobError(BaseModel):
    code: str
    message: str
    retryable: bool


class WebhookPublic(BaseModel):
    """Where a job's webhook delivery stands: attempts so far and how the last one went."""

    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    next_attempt_at: datetime | None = None


class JobPublic(BaseModel):
    id: str
    url: str
    status: JobStatusName
    task_type: str
    runtime: str
    queue: str
    priority: int
    metadata: dict[str, Any]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    result: JobResult | None = None
    error: JobError | None = None
    webhook: WebhookPublic | None = Field(
        None, description="Delivery of the job's callback_url; null without one."
    )


class ErrorResponse(BaseModel):
    detail: str
    code: str
