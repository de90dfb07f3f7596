"""What the HTTP runtimes' tests share."""

from __future__ import annotations

import json

from runtimes.base import Completion, GenerationRequest, Runtime
from runtimes.http import HTTPOptions

FAST = HTTPOptions(read_timeout_s=5, cancel_poll_s=0.02)


def ask(text: str, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kwargs)  # type: ignore[arg-type]


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer", "confidence"],
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA},
}

# The seed document's function-calling example.
CIRCLE_QUESTION = "Calculate the area of a circle with radius 5 units"
CIRCLE_TOOL = {
    "type": "function",
    "function": {
        "name": "calculate_circle_area",
        "description": "Area of a circle",
        "parameters": {
            "type": "object",
            "properties": {"radius": {"type": "number"}},
            "required": ["radius"],
        },
    },
}


def tool_conversation(call: dict) -> list[dict]:
    """The user's question, the model's tool call and the tool's answer: the next turn."""
    return [
        {"role": "user", "content": CIRCLE_QUESTION},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "78.54"},
    ]


async def call_then_answer(runtime: Runtime) -> tuple[Completion, dict, Completion]:
    """Ask the circle question with its tool, then send the call and its result on: the
    model calls the tool once (its arguments an instance of the schema), then answers."""
    called = await runtime.generate(ask(CIRCLE_QUESTION, tools=[CIRCLE_TOOL]))
    assert called.finish_reason == "tool_calls" and called.text == ""
    [call] = called.tool_calls or []
    assert call["function"]["name"] == "calculate_circle_area"
    assert json.loads(call["function"]["arguments"]) == {"radius": 0.5}  # JSON text, as OpenAI
    answer = await runtime.generate(
        GenerationRequest(messages=tool_conversation(call), tools=[CIRCLE_TOOL])
    )
    assert answer.finish_reason == "stop" and answer.text and answer.tool_calls is None
    return called, call, answer
