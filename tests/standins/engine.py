"""A continuous-batching model of an inference engine, shared by both stand-in servers.

Like vLLM's scheduler (and llama.cpp's parallel slots behind Ollama), at most
``max_num_seqs`` sequences run at once and the rest wait in a FIFO queue. One engine step
takes ``step_base_s + step_per_seq_s * running`` seconds and gives every running sequence
one token, so a loaded server slows down the way a real one does.

There is exactly one asyncio task stepping all sequences (started on demand, gone when
idle): benchmarks run the stand-ins on a 2-core machine beside the system under test, so
the stand-in must not cost a timer per token per request.

The text itself is a deterministic function of the prompt (see ``plan_reply``), so tests
can compute the answer they expect.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field, replace

VOCABULARY = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "as",
    "with",
    "was",
    "by",
    "at",
    "be",
    "this",
    "from",
    "or",
    "an",
    "are",
    "not",
    "step",
    "reason",
    "answer",
    "so",
    "then",
    "first",
    "next",
    "we",
    "have",
    "because",
    "therefore",
    "if",
    "each",
    "total",
    "value",
    "train",
    "speed",
    "hour",
    "km",
    "area",
    "rate",
    "sum",
    "number",
    "left",
    "right",
    "true",
    "false",
    "code",
    "loop",
    "list",
    "result",
)
"""Words the pseudo-model speaks; each generated token is one of them with a leading space."""

ECHO_PREFIX = "echo:"
"""A last user message starting with this is answered with the words after it, then stop."""


class QueueFull(Exception):
    """The engine's waiting queue is at its bound (Ollama answers 503 then)."""


def count_prompt_tokens(messages: list[dict]) -> int:
    """Whitespace words of every message, plus 4 per message for the chat template."""
    return sum(len(str(m.get("content") or "").split()) + 4 for m in messages)


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


@dataclass(frozen=True)
class Reply:
    """What a request will generate: its tokens (already cut at a stop string) and why it ends."""

    tokens: list[str]
    finish_reason: str  # "stop", "length" or "tool_calls"
    tool: str | None = None  # the function called; its arguments are the tokens
    reasoning: int = 0  # how many of the tokens, first, are thought (a reasoning model's)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def answer(self) -> str:
        return "".join(self.tokens[self.reasoning :])

    @property
    def thought(self) -> str:
        return "".join(self.tokens[: self.reasoning])


def with_reasoning(reply: Reply, thought_tokens: int, max_tokens: int | None) -> Reply:
    """The reply of a reasoning model: ``thought_tokens`` of thought, then the answer, all
    within ``max_tokens`` (a limit hit while thinking leaves no answer). A tool call or a
    reasoning-less server (0) is left as it is."""
    if thought_tokens <= 0 or reply.tool:
        return reply
    thought = [f" step{i}" for i in range(1, thought_tokens + 1)]
    tokens, finish = thought + reply.tokens, reply.finish_reason
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, finish = tokens[:max_tokens], "length"
    return replace(reply, tokens=tokens, finish_reason=finish, reasoning=len(thought))


def plan_reply(
    messages: list[dict],
    natural_len: int,
    max_tokens: int | None,
    seed: int | None = None,
    stop: list[str] | None = None,
    json_schema: dict | bool = False,
) -> Reply:
    """The reply to ``messages``: deterministic in the prompt and ``seed``.

    With ``json_schema`` (a schema, or True for any JSON object) the reply is JSON, as under
    guided decoding (vLLM's ``response_format``, Ollama's ``format``): an instance of the
    schema, or ``{"answer": ...}``; four characters a token.

    ``natural_len`` is where the model would emit EOS (ignored for echo prompts, which end
    after their words); ``max_tokens`` cuts earlier with finish reason "length". A stop string
    ends the text just before it, with finish reason "stop", as vLLM and Ollama do.
    """
    if json_schema:
        schema = json_schema if isinstance(json_schema, dict) else None
        return _json_reply(messages, schema, max_tokens, seed)
    user = _last_user_text(messages).lstrip()
    if user.lower().startswith(ECHO_PREFIX):
        words = [" " + w for w in user[len(ECHO_PREFIX) :].split()]
        natural_len = len(words)
    else:
        rng = random.Random(hashlib.sha256(repr((messages, seed)).encode()).digest())
        n = natural_len if max_tokens is None else min(natural_len, max_tokens)
        words = [" " + rng.choice(VOCABULARY) for _ in range(n)]
    finish = "stop"
    if max_tokens is not None and natural_len > max_tokens:
        words, finish = words[:max_tokens], "length"
    text = "".join(words)
    hits = [at for at in (text.find(s) for s in stop or [] if s) if at >= 0]
    if hits:
        words, finish = _cut(words, min(hits)), "stop"
    return Reply(words, finish)


def plan_tool_call(
    messages: list[dict], tools: list[dict] | None, choice: str | dict | None, seed: int | None
) -> Reply | None:
    """The tool call the "model" makes, or None for a text answer. Like a model that needs
    a tool once: a forced choice (``required``, or a named function) always calls it;
    ``auto`` calls the first tool until the conversation holds a tool result. Arguments are
    an instance of the function's ``parameters`` schema, streamed four characters a token.
    """
    if not tools or choice == "none":
        return None
    if choice in (None, "auto") and any(m.get("role") == "tool" for m in messages):
        return None
    wanted = choice["function"]["name"] if isinstance(choice, dict) else None
    function = next(t["function"] for t in tools if wanted in (None, t["function"]["name"]))
    words = plan_reply(messages, 3, None, seed).text.split()
    parameters = function.get("parameters")
    arguments = json.dumps(_instance(parameters, " ".join(words)) if parameters else {})
    return Reply(_json_tokens(arguments), "tool_calls", function["name"])


def _json_reply(
    messages: list[dict], schema: dict | None, max_tokens: int | None, seed: int | None
) -> Reply:
    words = plan_reply(messages, 6, None, seed).text.split()
    value = _instance(schema, " ".join(words)) if schema else {"answer": " ".join(words)}
    tokens = _json_tokens(json.dumps(value))
    if max_tokens is not None and len(tokens) > max_tokens:
        return Reply(tokens[:max_tokens], "length")
    return Reply(tokens, "stop")


def _json_tokens(text: str) -> list[str]:
    """JSON text as a model streams it under guided decoding: four characters a token."""
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def _instance(schema: dict, text: str) -> object:
    """A value matching ``schema`` (the JSON Schema subset structured outputs use)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {k: _instance(v, text) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_instance(schema.get("items") or {}, text)]
    return {"integer": 42, "number": 0.5, "boolean": True, "null": None}.get(kind, text)


def _cut(words: list[str], at: int) -> list[str]:
    """The tokens covering text[:at], the last one trimmed so the stop string is left out."""
    out: list[str] = []
    length = 0
    for w in words:
        if length + len(w) >= at:
            if at > length:
                out.append(w[: at - length])
            break
        out.append(w)
        length += len(w)
    return out


@dataclass
class LengthDistribution:
    """Where the model "emits EOS": a fixed length or a seeded random draw per request.

    Spec strings (the ``--output-len`` flag): ``"128"`` fixed; ``"uniform:32:512"``;
    ``"lognormal:5.0:0.6"`` (mu, sigma of the natural log); ``"exp:200"`` (mean).
    Draws come from one ``random.Random(seed)`` in arrival order, so a benchmark replays.
    """

    spec: str = "uniform:16:256"
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.draw()  # validate the spec early
        self._rng = random.Random(self.seed)

    def draw(self) -> int:
        kind, _, rest = self.spec.partition(":")
        args = [float(a) for a in rest.split(":")] if rest else []
        if not rest:
            return max(1, int(kind))
        if kind == "uniform":
            return self._rng.randint(int(args[0]), int(args[1]))
        if kind == "lognormal":
            return max(1, round(self._rng.lognormvariate(args[0], args[1])))
        if kind == "exp":
            return max(1, math.ceil(self._rng.expovariate(1.0 / args[0])))
        raise ValueError(f"unknown output length spec {self.spec!r}")


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. ``produced`` grows by one per step while it runs."""

    reply: Reply
    submitted_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    produced: int = 0
    aborted: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.produced >= len(self.reply.tokens)

    async def new_tokens(self, sent: int) -> list[str]:
        """Wait for tokens past ``sent``; an empty list means the sequence is finished."""
        while self.produced <= sent and not self.finished:
            await self.changed.wait()
            self.changed.clear()
        return self.reply.tokens[sent : self.produced]


class Engine:
    """Continuous batching: admit up to ``max_num_seqs``, step them all together."""

    def __init__(
        self,
        max_num_seqs: int = 64,
        step_base_s: float = 0.01,
        step_per_seq_s: float = 0.0002,
        max_queue: int | None = None,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.step_base_s = step_base_s
        self.step_per_seq_s = step_per_seq_s
        self.max_queue = max_queue
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.steps = 0
        self._task: asyncio.Task[None] | None = None

    def submit(self, reply: Reply) -> Sequence:
        """Queue a sequence; raises ``QueueFull`` when ``max_queue`` requests already wait."""
        if (
            self.max_queue is not None
            and len(self.waiting) >= self.max_queue
            and (len(self.running) >= self.max_num_seqs)
        ):
            raise QueueFull
        seq = Sequence(reply)
        if not reply.tokens:
            seq.scheduled_at = time.monotonic()
            return seq
        self.waiting.append(seq)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return seq

    def abort(self, seq: Sequence) -> None:
        """The client went away: free its slot at the next step, as vLLM's abort does."""
        seq.aborted = True
        if seq in self.waiting:
            self.waiting.remove(seq)

    async def _run(self) -> None:
        while self.running or self.waiting:
            while self.waiting and len(self.running) < self.max_num_seqs:
                seq = self.waiting.pop(0)
                seq.scheduled_at = time.monotonic()
                self.running.append(seq)
            await asyncio.sleep(self.step_base_s + self.step_per_seq_s * len(self.running))
            self.steps += 1
            still: list[Sequence] = []
            for seq in self.running:
                if seq.aborted:
                    continue
                seq.produced += 1
                seq.changed.set()
                if not seq.finished:
                    still.append(seq)
            self.running = still
