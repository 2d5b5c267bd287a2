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

from collections.abc import Callable, Iterator
from typing import Any

import httpx

from edgeshard.coordinator.sdk.client_base import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    Call,
    ClientCore,
    Result,
    StreamState,
    parse_result,
    raise_for_error,
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


class Client(ClientCore):
    """A synchronous client of an edgeshard server (`url` like http://127.0.0.1:8000, with or without /v1).

    `models()`, `cluster_info()`, `health()`, `generate(prompt, ...)` and `chat(messages, ...)` come from
    `ClientCore`; with `stream=True` the last two return a `TextStream`, else a `Result`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(url, model=model, api_key=api_key, timeout=timeout, http_class=httpx.Client)

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None
        raise_for_error(response, response.content)
        return response.json()

    def _get(self, path: str, pick: Callable[[Any], Any] = lambda body: body) -> Any:
        return pick(self._request("GET", path))

    def _send(self, call: Call) -> Result | TextStream:
        if call.stream:
            return TextStream(self, call.path, call.body, call.chat)
        return parse_result(self._request("POST", call.path, call.body), call.chat)

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
