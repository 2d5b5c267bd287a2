"""The OpenAI-compatible API on a real server (127.0.0.1, free port) over the demo model, driven by the
official `openai` package and raw HTTP: shapes, streaming, errors, concurrency, disconnects, admission."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline, Sequence, generate
from edgeshard.node.model.sampling import SamplingParams

CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def oai(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(api_server) -> str:
    return api_server.served.engine.model_name


def _wait_idle(engine, timeout=15.0) -> None:
    """Until no request runs and the stages hold no session (what a cancelled request must leave)."""
    executors = engine.pipeline.local.executors
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.running == 0 and engine.waiting == 0 and not any(ex.sessions for ex in executors):
            return
        time.sleep(0.05)
    raise AssertionError(f"still busy: {engine.stats()}, sessions {[len(ex.sessions) for ex in executors]}")


def test_models_list_and_retrieve(oai, model):
    assert [m.id for m in oai.models.list().data] == [model]
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_chat_stream_equals_non_stream(oai, model):
    full = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=CHAT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_text_is_the_greedy_generation(api_server, oai, model):
    """The served text equals decoding the tokens the same model generates outside the server."""
    engine = api_server.served.engine
    got = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=20, temperature=0)
    tok = engine.tokenizer
    seq = Sequence(tok.encode_chat(CHAT), SamplingParams(), 20, frozenset(tok.stop_token_ids))

    async def tokens() -> list[int]:
        return [t async for t in generate(AsyncLocalPipeline(engine.pipeline.local), seq)]

    torch.set_num_threads(1)
    ids = asyncio.run(tokens())
    assert got.choices[0].message.content == tok.decode(ids, skip_special_tokens=True)
    assert got.usage.prompt_tokens == len(seq.prompt) and got.usage.completion_tokens == len(ids)


def test_completions_stream_equals_non_stream(oai, model):
    full = oai.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=0
    )
    assert full.object == "text_completion" and full.choices[0].text
    chunks = list(
        oai.completions.create(
            model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"


def test_stop_string_cuts_the_text(oai, model):
    full = oai.completions.create(
        model=model, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0
    ).choices[0]
    stop = full.text[3:6]
    cut = oai.completions.create(
        model=model, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full.text[: full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(oai, model):
    runs = [
        oai.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0.9, seed=7)
        for _ in range(2)
    ]
    assert runs[0].choices[0].message.content == runs[1].choices[0].message.content


BAD = [
    ({"model": None}, "messages"),  # no messages
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -(2**63) - 1}, "seed"),  # was a 503 (fuzz)
]


@pytest.mark.parametrize("body, param", BAD)
def test_bad_request_then_a_good_one(api_server, oai, model, body, param):
    r = httpx.post(
        api_server.url + "/v1/chat/completions", json={k: v for k, v in body.items() if v is not None}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    ok = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0)
    assert ok.choices[0].message.content


def test_not_json_is_400(api_server):
    r = httpx.post(
        api_server.url + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=4)
    assert info.value.code == "model_not_found" and "gpt-4" in info.value.message


def test_prompt_beyond_the_context_is_400(api_server, oai, model):
    ctx = api_server.served.engine.context_length
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=model, prompt="word " * (ctx + 10), max_tokens=4)
    assert info.value.code == "context_length_exceeded" and str(ctx) in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # prompt fits, prompt + max_tokens does not
        oai.chat.completions.create(model=model, messages=CHAT, max_tokens=ctx)
    assert info.value.code == "context_length_exceeded"
    assert oai.completions.create(model=model, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_simultaneous_requests_get_their_own_answers(api_server, model):
    prompts = ["Name a fruit.", "What is 3 times 4?", "Say hello in French.", "Name a planet."]

    async def ask(client, p):
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0
        )
        return r.choices[0].message.content

    async def main():
        async with openai.AsyncOpenAI(base_url=api_server.url + "/v1", api_key="x", max_retries=0) as client:
            alone = [await ask(client, p) for p in prompts]
            together = await asyncio.gather(*(ask(client, p) for p in prompts))
            return alone, together

    alone, together = asyncio.run(main())
    assert together == alone
    assert len(set(alone)) == len(prompts)  # different questions, different answers: no mixing


def test_stream_disconnect_frees_the_sequence(api_server):
    engine = api_server.served.engine
    body = {"messages": CHAT, "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", api_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        assert engine.running == 1
    _wait_idle(engine)  # the stream was 500 tokens long: only cancelling frees it this fast


def test_non_stream_disconnect_frees_the_sequence(api_server):
    engine = api_server.served.engine
    body = {"messages": CHAT, "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api_server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    _wait_idle(engine)


def test_full_cluster_is_429_and_recovers(api_server, oai, model):
    engine = api_server.served.engine
    limits = engine.max_running, engine.max_queued
    engine.max_running, engine.max_queued = 1, 0  # admission reads these on every submit
    try:
        with httpx.stream(
            "POST",
            api_server.url + "/v1/chat/completions",
            timeout=60,
            # greedy and ignoring end-of-sequence: the first request surely still runs when the second comes
            json={"messages": CHAT, "max_tokens": 500, "stream": True, "temperature": 0, "ignore_eos": True},
        ) as r:
            next(r.iter_lines())
            with pytest.raises(openai.RateLimitError) as info:
                oai.chat.completions.create(model=model, messages=CHAT, max_tokens=4)
            assert info.value.code == "cluster_busy"
    finally:
        engine.max_running, engine.max_queued = limits
    _wait_idle(engine)
    assert oai.chat.completions.create(model=model, messages=CHAT, max_tokens=4).choices[0].message.content


def test_health_and_cluster_info(api_server):
    health = httpx.get(api_server.url + "/health").json()
    assert health["status"] == "ok"
    info = httpx.get(api_server.url + "/v1/cluster").json()
    assert info["plan"][0]["node"] == "local" and info["nodes"][0]["steps"] > 0
    assert info["engine"]["requests"] >= 1 and info["context_length"] > 0


def test_unknown_route_has_the_error_shape(api_server):
    r = httpx.get(api_server.url + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
