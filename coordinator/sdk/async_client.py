"""The asyncio client of the SDK (`AsyncClient`); see sdk.py for the overview."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
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


class AsyncClient(ClientCore):
    """An asyncio client of an edgeshard server; the same methods as `Client` (from `ClientCore`), awaited.

    `await client.chat(messages)` gives a Result; `client.chat(messages, stream=True)` an `AsyncTextStream`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(url, model=model, api_key=api_key, timeout=timeout, http_class=httpx.AsyncClient)

    async def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            response = await self.http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from None
        raise_for_error(response, response.content)
        return response.json()

    async def _get(self, path: str, pick: Callable[[Any], Any] = lambda body: body) -> Any:
        return pick(await self._request("GET", path))

    def _send(self, call: Call) -> Awaitable[Result] | AsyncTextStream:
        if call.stream:
            return AsyncTextStream(self, call.path, call.body, call.chat)
        return self._complete(call)

    async def _complete(self, call: Call) -> Result:
        return parse_result(await self._request("POST", call.path, call.body), call.chat)

    async def aclose(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
