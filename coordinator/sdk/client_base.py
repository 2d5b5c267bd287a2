"""What both SDK clients share: result types, request bodies, SSE parsing, errors from responses (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from edgeshard.coordinator.errors import ServerUnavailableError, error_from_body

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0  # a long answer on a slow cluster takes minutes; connecting must not


@dataclass
class Usage:
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass
class Result:
    """A finished generation: its text, why it ended ("stop" or "length"), and token counts."""

    text: str
    finish_reason: str | None
    usage: Usage
    model: str = ""
    id: str = ""

    def __str__(self) -> str:
        return self.text


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def as_messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return (
        [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
    )


def request_body(model: str | None, stream: bool, options: dict[str, Any], **what: Any) -> dict[str, Any]:
    body = {**what, **{k: v for k, v in options.items() if v is not None}, "stream": stream}
    if model is not None:
        body["model"] = model
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def parse_result(body: dict[str, Any], chat: bool) -> Result:
    choice = body["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Result(
        text or "",
        choice.get("finish_reason"),
        Usage(**body.get("usage", {})),
        body.get("model", ""),
        body.get("id", ""),
    )


def unreachable(url: str, e: Exception) -> ServerUnavailableError:
    return ServerUnavailableError(
        f"cannot reach the edgeshard server at {url} ({type(e).__name__}: {e}); "
        "is `edgeshard serve` running there?",
        code="unreachable",
    )


def raise_for_error(response: httpx.Response, content: bytes) -> None:
    if response.status_code >= 400:
        try:
            body = json.loads(content)
        except ValueError:
            body = content.decode(errors="replace")
        raise error_from_body(response.status_code, body)


class StreamState:
    """Parses SSE lines into text pieces, recording finish reason and usage as they pass."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False

    def piece(self, line: str) -> str | None:
        """The text a `data:` line adds ("" for none); None at the end of the stream."""
        if not line.startswith("data:"):
            return ""  # blank separators, comments, event names
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "error" in event:
            raise error_from_body(None, event)
        if event.get("usage"):
            self.usage = Usage(**event["usage"])
        text = ""
        for choice in event.get("choices", []):
            text += (choice.get("delta", {}).get("content") if self.chat else choice.get("text")) or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.pieces.append(text)
        return text

    @property
    def result(self) -> Result:
        """What the stream has made so far, as a Result."""
        return Result("".join(self.pieces), self.finish_reason, self.usage or Usage())
