"""The Python SDK: clients for an edgeshard server, and a whole local cluster for notebooks and classrooms.

    from edgeshard.coordinator import Client, LocalCluster

    with LocalCluster(model="smollm2-135m", nodes=3) as cluster:     # 3 node processes + a server
        client = cluster.client()
        print(client.chat("Why is the sky blue?", max_tokens=64).text)
        for piece in client.chat([{"role": "user", "content": "Hi"}], stream=True):
            print(piece, end="", flush=True)

`Client` (sync) and `AsyncClient` speak the server's OpenAI-compatible API over httpx; server errors come back
as the same typed exceptions the server raised (`BadRequestError`, `ModelNotFoundError`, `ClusterBusyError`,
`ServerUnavailableError`, all `EdgeshardError`). `LocalCluster` lives in `local_cluster.py`; this module and
the clients import nothing heavy (`AsyncClient` is in async_client.py, what both share in client_base.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx

from edgeshard.coordinator.sdk.client_base import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    Result,
    StreamState,
    as_messages,
    base_url,
    parse_result,
    raise_for_error,
    request_body,
    unreachable,
)


class TextStream:
    """An iterator of text pieces as the server makes them; `.result` (text, finish_reason, usage) after it."""

    def __init__(self, client: Client, path: str, body: dict[str, Any], chat: bool) -> None:
        self._state = StreamState(chat)
        self._cm = client.http.stream("POST", path, json=body)
        self._url = client.url
        try:
            self._response = self._cm.__enter__()
        except httpx.TransportError as e:
            raise unreachable(self._url, e) from None
        if self._response.status_code >= 400:
            content = self._response.read()
            self.close()
            raise_for_error(self._response, content)

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self._response.iter_lines():
                piece = self._state.piece(line)
                if piece is None:
                    break
                if piece:
                    yield piece
        except httpx.TransportError as e:
            raise unreachable(self._url, e) from None
        finally:
            self.close()

    @property
    def result(self) -> Result:
        """The text so far, the finish reason and usage (complete once iteration has ended)."""
        return self._state.result

    def close(self) -> None:
        """Stop reading; the server stops generating."""
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A synchronous client of an edgeshard server (`url` like http://127.0.0.1:8000, with or without /v1)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url = base_url(url)
        self.model = model  # None: the server's model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None
        raise_for_error(response, response.content)
        return response.json()

    def models(self) -> list[dict[str, Any]]:
        """The models the server serves (OpenAI model cards)."""
        return self._request("GET", "/v1/models")["data"]

    def cluster_info(self) -> dict[str, Any]:
        """The cluster: plan, nodes with per-stage timings, admission counters."""
        return self._request("GET", "/v1/cluster")

    def health(self) -> dict[str, Any]:
        """The server's health (raises ServerUnavailableError when no plan can run)."""
        return self._request("GET", "/health")

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
    ) -> Result | TextStream:
        """Continue `prompt` (no chat template): a Result, or with stream=True a TextStream of pieces."""
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed
        )
        return self._run(
            "/v1/completions", request_body(self.model, stream, options, prompt=prompt), False, stream
        )

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
    ) -> Result | TextStream:
        """Answer chat `messages` (a string is one user message): a Result, or with stream=True a TextStream."""
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed
        )
        return self._run(
            "/v1/chat/completions",
            request_body(self.model, stream, options, messages=as_messages(messages)),
            True,
            stream,
        )

    def _run(self, path: str, body: dict, chat: bool, stream: bool) -> Result | TextStream:
        if stream:
            return TextStream(self, path, body, chat)
        return parse_result(self._request("POST", path, body), chat)

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
