"""The asyncio client of the SDK (`AsyncClient`); see sdk.py for the overview."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
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


class AsyncTextStream:
    """An async iterator of text pieces; `async for p in client.chat(..., stream=True)` (awaiting it also works)."""

    def __init__(self, client: AsyncClient, path: str, body: dict[str, Any], chat: bool) -> None:
        self._client, self._path, self._body = client, path, body
        self._state = StreamState(chat)
        self._cm = None
        self._response: httpx.Response | None = None

    async def _open(self) -> AsyncTextStream:
        if self._cm is None:
            self._cm = self._client.http.stream("POST", self._path, json=self._body)
            try:
                self._response = await self._cm.__aenter__()
            except httpx.TransportError as e:
                raise unreachable(self._client.url, e) from None
            if self._response.status_code >= 400:
                content = await self._response.aread()
                await self.aclose()
                raise_for_error(self._response, content)
        return self

    def __await__(self):
        return self._open().__await__()

    async def __aiter__(self) -> AsyncIterator[str]:
        await self._open()
        try:
            async for line in self._response.aiter_lines():
                piece = self._state.piece(line)
                if piece is None:
                    break
                if piece:
                    yield piece
        except httpx.TransportError as e:
            raise unreachable(self._client.url, e) from None
        finally:
            await self.aclose()

    @property
    def result(self) -> Result:
        """The text so far, the finish reason and usage (complete once iteration has ended)."""
        return self._state.result

    async def aclose(self) -> None:
        """Stop reading; the server stops generating."""
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)


class AsyncClient:
    """An asyncio client of an edgeshard server; the same methods as `Client`, awaited."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url = base_url(url)
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    async def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            response = await self.http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None
        raise_for_error(response, response.content)
        return response.json()

    async def models(self) -> list[dict[str, Any]]:
        """The models the server serves (OpenAI model cards)."""
        return (await self._request("GET", "/v1/models"))["data"]

    async def cluster_info(self) -> dict[str, Any]:
        """The cluster: plan, nodes with per-stage timings, admission counters."""
        return await self._request("GET", "/v1/cluster")

    async def health(self) -> dict[str, Any]:
        """The server's health (raises ServerUnavailableError when no plan can run)."""
        return await self._request("GET", "/health")

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
    ):
        """`await client.generate(prompt)` -> Result; `client.generate(prompt, stream=True)` -> AsyncTextStream."""
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
    ):
        """`await client.chat(messages)` -> Result; `client.chat(messages, stream=True)` -> AsyncTextStream."""
        options = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed
        )
        return self._run(
            "/v1/chat/completions",
            request_body(self.model, stream, options, messages=as_messages(messages)),
            True,
            stream,
        )

    def _run(self, path: str, body: dict, chat: bool, stream: bool):
        if stream:
            return AsyncTextStream(self, path, body, chat)
        return self._complete(path, body, chat)

    async def _complete(self, path: str, body: dict, chat: bool) -> Result:
        return parse_result(await self._request("POST", path, body), chat)

    async def aclose(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
