"""What both SDK clients share: result types, the request-making half (`ClientCore`), SSE parsing, errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
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


@dataclass(frozen=True)
class Call:
    """One generation request, ready to send: where, what, whether it is a chat, whether to stream."""

    path: str
    body: dict[str, Any]
    chat: bool
    stream: bool


class ClientCore:
    """The half of a client that makes requests; `Client` and `AsyncClient` send them (`_send`, `_get`).

    The sync client returns values, the async one awaitables: every public method here returns what the
    subclass's `_send` / `_get` return, so both clients have one definition of each request.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None,
        api_key: str | None,
        timeout: float,
        http_class: Callable[..., Any],
    ) -> None:
        self.url = base_url(url)
        self.model = model  # None: the server's model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http_class(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def _send(self, call: Call) -> Any:
        raise NotImplementedError

    def _get(self, path: str, pick: Callable[[Any], Any] = lambda body: body) -> Any:
        raise NotImplementedError

    def models(self) -> Any:
        """The models the server serves (OpenAI model cards)."""
        return self._get("/v1/models", lambda body: body["data"])

    def cluster_info(self) -> Any:
        """The cluster: plan, nodes with per-stage timings, admission counters."""
        return self._get("/v1/cluster")

    def health(self) -> Any:
        """The server's health (raises ServerUnavailableError when no plan can run)."""
        return self._get("/health")

    def generate(
        self,
        prompt: str,
        *,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> Any:
        """Continue `prompt` (no chat template): a Result, or with stream=True a stream of text pieces.

        `Client` returns them directly, `AsyncClient` as an awaitable Result or an `AsyncTextStream`.
        """
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed
        )
        body = request_body(self.model, stream, options, prompt=prompt)
        return self._send(Call("/v1/completions", body, False, stream))

    def chat(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        *,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> Any:
        """Answer chat `messages` (a string is one user message): a Result, or with stream=True a stream.

        `Client` returns them directly, `AsyncClient` as an awaitable Result or an `AsyncTextStream`.
        """
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed
        )
        body = request_body(self.model, stream, options, messages=as_messages(messages))
        return self._send(Call("/v1/chat/completions", body, True, stream))
