"""The Python SDK (sync and async) and `edgeshard chat` against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import socket

import pytest

from edgeshard.coordinator import AsyncClient, Client
from edgeshard.coordinator.cli.serve import chat_repl
from edgeshard.coordinator.sdk import (
    BadRequestError,
    ContextLengthError,
    EdgeshardError,
    ModelNotFoundError,
    Result,
    ServerUnavailableError,
)

MESSAGES = [{"role": "user", "content": "What is the capital of Italy?"}]


@pytest.fixture(scope="module")
def client(api_server):
    with Client(api_server.url + "/v1") as c:  # with or without /v1
        yield c


def test_models_and_cluster_info(client, api_server):
    assert [m["id"] for m in client.models()] == [api_server.served.engine.model_name]
    info = client.cluster_info()
    assert info["plan"] and info["engine"]["max_running"] >= 1
    assert client.health()["status"] == "ok"


def test_chat_result_and_stream_agree(client):
    result = client.chat(MESSAGES, max_tokens=16, temperature=0)
    assert isinstance(result, Result) and result.text and str(result) == result.text
    assert result.finish_reason in ("stop", "length")
    assert result.usage.completion_tokens > 0 and result.usage.total_tokens > result.usage.completion_tokens
    stream = client.chat(MESSAGES, max_tokens=16, temperature=0, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == result.text
    assert stream.result.usage == result.usage and stream.result.finish_reason == result.finish_reason


def test_generate_and_a_string_chat(client):
    done = client.generate("The capital of France is", max_tokens=6, temperature=0)
    assert done.usage.completion_tokens == 6 and done.finish_reason == "length"
    assert (
        "".join(client.generate("The capital of France is", max_tokens=6, temperature=0, stream=True))
        == done.text
    )
    assert client.chat("Hi!", max_tokens=4, temperature=0).text


def test_typed_errors_carry_the_server_message(client, api_server):
    with pytest.raises(BadRequestError, match="max_tokens") as info:
        client.chat(MESSAGES, max_tokens=-1)
    assert info.value.param == "max_tokens" and info.value.status == 400
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.chat(MESSAGES, max_tokens=0, stream=True)  # refused before any text: raised on the call
    with pytest.raises(ContextLengthError):
        client.generate("word " * (api_server.served.engine.context_length + 1), max_tokens=2)
    with (
        Client(api_server.url, model="no-such-model") as other,
        pytest.raises(ModelNotFoundError, match="no-such"),
    ):
        other.chat(MESSAGES)
    assert client.chat(MESSAGES, max_tokens=2, temperature=0).text  # the server is fine afterwards


def test_unreachable_server_is_server_unavailable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}") as c, pytest.raises(ServerUnavailableError, match="cannot reach"):
        c.models()
    assert issubclass(ServerUnavailableError, EdgeshardError)


def test_async_client(api_server, client):
    expected = client.chat(MESSAGES, max_tokens=12, temperature=0).text

    async def main():
        async with AsyncClient(api_server.url) as c:
            models = await c.models()
            result = await c.chat(MESSAGES, max_tokens=12, temperature=0)
            pieces = [p async for p in c.chat(MESSAGES, max_tokens=12, temperature=0, stream=True)]
            awaited = await c.generate("The capital of France is", max_tokens=4, temperature=0, stream=True)
            gen_pieces = [p async for p in awaited]
            both = await asyncio.gather(*(c.chat(MESSAGES, max_tokens=12, temperature=0) for _ in range(2)))
            with pytest.raises(BadRequestError, match="n must be 1|max_tokens"):
                await c.chat(MESSAGES, max_tokens=-3)
            with pytest.raises(BadRequestError):
                async for _ in c.chat(MESSAGES, max_tokens=-3, stream=True):
                    pass
            return models, result, pieces, gen_pieces, both, (await c.cluster_info())

    models, result, pieces, gen_pieces, both, info = asyncio.run(main())
    assert models[0]["id"] == api_server.served.engine.model_name
    assert result.text == expected == "".join(pieces) == both[0].text == both[1].text
    assert gen_pieces and info["nodes"]


def test_chat_repl_keeps_history_and_resets(client):
    out = io.StringIO()
    lines = iter(
        ["What is the capital of Italy?", "", "And of France?", "/reset", "Hello", "/exit", "ignored"]
    )
    history = chat_repl(client, lines, out, system="Answer briefly.", max_tokens=8, temperature=0)
    # after /reset only the system prompt and the last exchange remain
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "Hello" and history[2]["content"]
    assert "(conversation reset)" in out.getvalue() and "ignored" not in out.getvalue()


def test_chat_repl_reports_errors_and_goes_on(client):
    out = io.StringIO()
    history = chat_repl(client, iter(["Hi", "/exit"]), out, max_tokens=-1)
    assert "error:" in out.getvalue() and history == []


def test_chat_repl_keeps_slash_commands_to_itself(client):
    out = io.StringIO()
    lines = iter(["/help", "/bogus", "//etc is a directory?", "/exit"])
    history = chat_repl(client, lines, out, max_tokens=4, temperature=0)
    # /help and /bogus never reach the model; `//` sends the line with one slash
    assert [m["content"] for m in history if m["role"] == "user"] == ["/etc is a directory?"]
    text = out.getvalue()
    assert "commands: /help" in text and "unknown command /bogus" in text and "/reset" in text
