"""The HTTP API's guards on a real server (127.0.0.1, free port): API key (401 in OpenAI's shape), closed CORS,
request-body bound (413), and random JSON bodies (hypothesis) that must each get a typed answer."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard.coordinator.errors import AuthenticationError
from edgeshard.coordinator.sdk import Client
from edgeshard.coordinator.serving.assemble import local_engine
from edgeshard.coordinator.serving.http_security import HttpSecurity
from edgeshard.coordinator.serving.http_server import BackgroundServer

KEY = "sk-edgeshard-test-0123456789"
ALLOWED = "https://classroom.example"
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def keyed_server(smollm2_path):
    security = HttpSecurity(api_key=KEY, cors_origins=(ALLOWED,), max_body_bytes=256 << 10)
    server = BackgroundServer(
        lambda: local_engine("smollm2-135m", threads=1, max_running=2, max_queued=2),
        http_security=security,
    )
    server.start()
    yield server
    server.stop()


def _is_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def test_no_key_or_wrong_key_is_401_and_the_right_key_is_200(keyed_server, caplog):
    url = keyed_server.url
    with httpx.Client(base_url=url, timeout=60) as http:
        _is_openai_error(http.get("/v1/models"), 401, "invalid_api_key")
        for header in (f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", KEY, f"Basic {KEY}", "Bearer"):
            _is_openai_error(
                http.get("/v1/models", headers={"Authorization": header}), 401, "invalid_api_key"
            )
        chat = {"messages": CHAT, "max_tokens": 2}
        _is_openai_error(http.post("/v1/chat/completions", json=chat), 401, "invalid_api_key")
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert http.get("/health").status_code == 200  # probes stay open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    reply = oai.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens > 0
    with Client(url) as client, pytest.raises(AuthenticationError):
        client.models()
    with Client(url, api_key=KEY) as client:
        assert client.models()[0]["id"]


def test_cors_is_closed_unless_the_origin_is_listed(keyed_server, api_server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    for url in (keyed_server.url, api_server.url):  # listed elsewhere / no CORS configured at all
        r = httpx.options(
            url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in r.headers, r.headers
        r = httpx.get(url + "/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    r = httpx.options(keyed_server.url + "/v1/chat/completions", headers={"Origin": ALLOWED, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED


def test_oversized_bodies_are_413_before_parsing(keyed_server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (300 << 10)}]}).encode()
    with httpx.Client(base_url=keyed_server.url, timeout=60) as http:
        _is_openai_error(http.post("/v1/chat/completions", content=big, headers=headers), 413)

        def chunks():  # no Content-Length: counted while it arrives
            for _ in range(40):
                yield b"x" * 8192

        _is_openai_error(http.post("/v1/chat/completions", content=chunks(), headers=headers), 413)
        assert http.get("/v1/models", headers=headers).status_code == 200


# ---------------------------------------------------------------------------------------------- fuzzing
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus", ""]) | _json},
    optional={"content": st.text(max_size=60) | _json, "name": st.text(max_size=8)},
)
_field = {  # near-valid bodies; max_tokens always small (a valid body generates at most a few tokens)
    "max_tokens": st.integers(-3, 3) | st.sampled_from(["2", 2.5, None, [], 10**30]),
    "temperature": st.floats(-1, 3, allow_nan=False) | _json,
    "top_p": st.floats(-1, 2, allow_nan=False) | _json,
    "stream": st.booleans() | _json,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=20) | _json,
    "n": st.integers(-2, 3),
    "seed": st.integers(-(2**70), 2**70),
    "model": st.sampled_from(["smollm2-135m", "gpt-4", ""]) | _json,
}


def _bodies(kind: str):
    required = (
        {"messages": st.lists(_message, max_size=3) | _json}
        if kind == "chat"
        else {"prompt": st.text(max_size=60) | st.lists(st.integers(-5, 70000), max_size=6) | _json}
    )
    near_valid = st.fixed_dictionaries(required, optional=_field).filter(
        lambda b: isinstance(b.get("max_tokens"), int) and not isinstance(b.get("max_tokens"), bool)
    )
    valid = st.fixed_dictionaries(
        {"max_tokens": st.integers(1, 3)},
        optional={
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.05, 1),
            "stream": st.booleans(),
            "seed": st.integers(0, 2**31),
            "stop": st.text(max_size=3),
        },
    ).map(
        lambda b: {
            **b,
            **(
                {"messages": [{"role": "user", "content": "Hi there"}]}
                if kind == "chat"
                else {"prompt": "Once upon a time"}
            ),
        }
    )
    return valid | near_valid | _json | st.binary(max_size=64)


FUZZ = {"tried": 0, "statuses": {}}


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(kind=st.sampled_from(["chat", "completion"]), data=st.data())
def _fuzz_once(url: str, kind: str, data) -> None:
    body = data.draw(_bodies(kind))
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + path, content=content, headers=headers, timeout=60)  # a hang fails here
    FUZZ["tried"] += 1
    FUZZ["statuses"][r.status_code] = FUZZ["statuses"].get(r.status_code, 0) + 1
    assert r.status_code in (200, 400, 404, 429), (r.status_code, r.text, body)
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text, r.text


def test_random_bodies_get_typed_answers_and_the_server_keeps_serving(keyed_server, capsys):
    oai = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    ask = dict(model="smollm2-135m", messages=CHAT, max_tokens=6, temperature=0)
    before = oai.chat.completions.create(**ask).choices[0].message.content
    _fuzz_once(keyed_server.url)
    after = oai.chat.completions.create(**ask).choices[0].message.content
    assert after == before
    with capsys.disabled():
        print(
            f"\nHTTP fuzz: {FUZZ['tried']} bodies tried, answers by status {sorted(FUZZ['statuses'].items())}"
        )
    assert FUZZ["tried"] >= 100
