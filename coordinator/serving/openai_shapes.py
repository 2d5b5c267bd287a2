"""OpenAI's wire shapes: request models (pydantic) and response / stream-chunk builders (pure functions).

Requests accept the fields OpenAI clients send; fields that would change the answer but are not implemented
(logprobs, tools, penalties, n > 1, ...) are refused with a 400 that names them instead of being ignored.
Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeshard.coordinator.errors import BadRequestError
from edgeshard.coordinator.serving.engine import GenerationRequest
from edgeshard.node.model.sampling import SEED_LIMIT, TOP_K_LIMIT

if TYPE_CHECKING:
    from edgeshard.coordinator.serving.engine import Completion, Engine, Generation, Usage

MAX_STOP_STRINGS = 16
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\])$")


class StreamOptions(BaseModel):
    """`stream_options`: with include_usage, a last chunk carries the usage."""

    include_usage: bool = False


class _Common(BaseModel):
    """Sampling and streaming fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the served model (OpenAI requires it; curl users forget it)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: 1.0, OpenAI's default
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, lt=TOP_K_LIMIT)  # not OpenAI's; vLLM and llama.cpp servers take it
    ignore_eos: bool = False  # not OpenAI's (vLLM's): end tokens do not stop it (benchmarks)
    seed: int | None = Field(None, ge=-SEED_LIMIT, lt=SEED_LIMIT)  # 64 bits on the wire to the nodes
    stop: str | list[str] | None = Field(None)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.n not in (None, 1):
            raise ValueError(
                "n: edgeshard makes one choice per request; n must be 1 (send n requests instead)"
            )
        if self.frequency_penalty or self.presence_penalty or self.logit_bias:
            raise ValueError(
                "frequency_penalty, presence_penalty and logit_bias are not supported; leave them out"
            )
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _generation(self, **what: Any) -> GenerationRequest:
        return GenerationRequest(
            model=self.model,
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            ignore_eos=self.ignore_eos,
            **what,
        )


class ChatMessage(BaseModel):
    """One chat message; content is a string or OpenAI content parts (text only)."""

    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed on to the chat template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.logprobs:
            raise ValueError("logprobs: not supported by edgeshard yet; leave it out")
        if self.tools:
            raise ValueError("tools: tool calling is not supported by edgeshard yet; leave them out")
        return self

    def to_generation(self) -> GenerationRequest:
        """The engine's request."""
        req = self._generation(messages=[m.model_dump(exclude_none=True) for m in self.messages])
        req.max_tokens = self.max_completion_tokens or self.max_tokens
        return req


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if (
            isinstance(self.prompt, list)
            and self.prompt
            and isinstance(self.prompt[0], str)
            and len(self.prompt) != 1
        ):
            raise ValueError("prompt: give one prompt per request (a string), not a batch of prompts")
        if self.echo or self.logprobs or (self.best_of or 1) != 1 or self.suffix:
            raise ValueError("echo, logprobs, best_of and suffix are not supported; leave them out")
        return self

    def to_generation(self) -> GenerationRequest:
        """The engine's request."""
        prompt = (
            self.prompt[0]
            if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str)
            else self.prompt
        )
        return self._generation(prompt=prompt)


def validation_error(errors: list[dict[str, Any]]) -> BadRequestError:
    """A pydantic validation failure as one clear 400: which field, what is wrong."""
    if not errors:
        return BadRequestError("invalid request")
    e = errors[0]
    # union members add their type to the location (stop.str, prompt.list[int]); drop them to name the field
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return BadRequestError(f"the request body is not valid JSON: {e.get('msg')}")
    if e.get("type") == "missing":
        return BadRequestError(
            f"'{param}' is required" if param else "the request needs a JSON body", param=param
        )
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    if e.get("type") == "value_error":  # our own checks name their field first ("n: ...")
        field, _, rest = msg.partition(": ")
        return BadRequestError(msg, param=field if rest and " " not in field else param)
    got = json.dumps(e.get("input"), default=str)[:80]
    return BadRequestError(f"invalid '{param}': {msg} (got {got})", param=param)


def _usage(usage: Usage) -> dict[str, int]:
    return usage.to_dict()


def model_card(engine: Engine) -> dict[str, Any]:
    """The served model as /v1/models lists it."""
    return {
        "id": engine.model_name,
        "object": "model",
        "created": engine.created,
        "owned_by": "edgeshard",
        "context_length": engine.context_length,
    }


def chat_response(engine: Engine, gen: Generation, c: Completion) -> dict[str, Any]:
    """A non-streamed chat completion."""
    return {
        "id": f"chatcmpl-{gen.id}",
        "object": "chat.completion",
        "created": gen.created,
        "model": engine.model_name,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
        ],
        "usage": _usage(c.usage),
    }


def chat_chunk(
    engine: Engine,
    gen: Generation,
    delta: dict | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """A chat stream chunk; `delta=None` makes the usage-only chunk (no choices)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    chunk = {
        "id": f"chatcmpl-{gen.id}",
        "object": "chat.completion.chunk",
        "created": gen.created,
        "model": engine.model_name,
        "system_fingerprint": None,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = _usage(usage)
    return chunk


def completion_response(engine: Engine, gen: Generation, c: Completion) -> dict[str, Any]:
    """A non-streamed text completion."""
    return {
        "id": f"cmpl-{gen.id}",
        "object": "text_completion",
        "created": gen.created,
        "model": engine.model_name,
        "choices": [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}],
        "usage": _usage(c.usage),
    }


def completion_chunk(
    engine: Engine,
    gen: Generation,
    text: str | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """A completion stream chunk; `text=None` makes the usage-only chunk."""
    choices = (
        [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    )
    chunk = {
        "id": f"cmpl-{gen.id}",
        "object": "text_completion",
        "created": gen.created,
        "model": engine.model_name,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = _usage(usage)
    return chunk


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
