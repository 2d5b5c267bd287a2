"""The HTTP API's guards on a real server (127.0.0.1, free port): API key on every route but /livez (401 in
OpenAI's shape), no empty key, no key-less API beyond loopback, the Host check, HTTPS, closed CORS,
request-body bound (413), and random JSON bodies (hypothesis) that must each get a typed answer."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard.coordinator.errors import AuthenticationError, UserError
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
        _is_openai_error(http.get("/health"), 401, "invalid_api_key")  # behind the key too (#20)
        assert http.get("/livez").json() == {"status": "alive"}  # the one open probe
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


def test_every_route_but_livez_wants_the_key(keyed_server):
    """Protected in front of the app, not per route: the docs, the schema, the probes, /metrics and unknown
    paths are all 401 without the key; /livez answers, and the dashboard's page loads (it holds no data: it
    asks for the key, and every figure it shows comes from routes behind the key)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed_server.url, timeout=60) as http:
        page = http.get("/")  # the page itself: its login form, and no figure of the cluster
        assert page.status_code == 200 and 'id="login"' in page.text and "127.0.0.1:" not in page.text
        for path in (
            "/docs",
            "/v1/openapi.json",
            "/health",
            "/v1/cluster",
            "/metrics",
            "/nope",
            "/v1/models",
        ):
            _is_openai_error(http.get(path), 401, "invalid_api_key")
            assert http.get(path).headers["www-authenticate"] == "Bearer"
        _is_openai_error(http.post("/livez"), 401)  # GET/HEAD only
        live = http.get("/livez")
        assert live.status_code == 200 and live.json() == {"status": "alive"}  # nothing about the cluster
        for path in ("/docs", "/v1/openapi.json", "/health", "/v1/cluster"):
            assert http.get(path, headers=auth).status_code == 200, path


def test_the_host_header_must_name_this_server(keyed_server, api_server):
    """DNS rebinding: a page on evil.example that resolves its name to 127.0.0.1 still sends Host:
    evil.example; loopback servers answer only their own names (with or without a key)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    for server, headers in ((keyed_server, auth), (api_server, {})):
        port = server.port
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
                r = http.get("/v1/models", headers={**headers, "Host": host})
                _is_openai_error(r, 400, "invalid_host")
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}"):
                assert http.get("/v1/models", headers={**headers, "Host": host}).status_code == 200, host


def test_an_empty_key_or_a_keyless_lan_api_is_refused_before_serving(tmp_path):
    for empty in ("", "   "):
        with pytest.raises(UserError, match="empty"):
            HttpSecurity(api_key=empty)
    server = BackgroundServer(lambda: None, host="0.0.0.0")  # refused before binding anything
    with pytest.raises(UserError, match="needs an API key"):
        server.start()
    env = {k: v for k, v in os.environ.items() if k != "EDGESHARD_API_KEY"}
    (tmp_path / "empty.key").write_text("\n")
    cases = [
        (["--api-key", ""], {}, "empty"),
        ([], {"EDGESHARD_API_KEY": ""}, "set but empty"),
        (["--api-key-file", str(tmp_path / "missing.key")], {}, "cannot read the API key file"),
        (["--api-key-file", str(tmp_path / "empty.key")], {}, "is empty"),
        (["--http", "0.0.0.0:0"], {}, "needs an API key"),
        (["--api-key", "k", "--tls-cert", str(tmp_path / "c.pem")], {}, "no such file"),
    ]
    cli = [sys.executable, "-m", "edgeshard.coordinator.cli", "serve", "--model", "smollm2-135m"]
    for argv, extra, expect in cases:
        r = subprocess.run([*cli, *argv], capture_output=True, text=True, env={**env, **extra}, timeout=120)
        assert r.returncode == 2 and expect in r.stderr, (argv, r.stderr)
        assert r.stderr.startswith("edgeshard: error:") and len(r.stderr.strip().splitlines()) == 1


def _tls_files(tmp_path):
    """A CA and a certificate for 127.0.0.1 signed by it (PEM files): what a user brings to --tls-cert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = {"ca": ca.public_bytes(pem), "cert": cert.public_bytes(pem)}
    files["key"] = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.pem"
        out[name].write_bytes(data)
    return out


def test_https_with_tls_cert_and_key(tmp_path, smollm2_path):
    files = _tls_files(tmp_path)
    security = HttpSecurity(api_key=KEY, tls_cert=str(files["cert"]), tls_key=str(files["key"]))
    server = BackgroundServer(
        lambda: local_engine("smollm2-135m", threads=1, max_running=1, max_queued=1), http_security=security
    )
    url = server.start()
    try:
        assert url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(files["ca"]))
        with httpx.Client(base_url=url, verify=trust, timeout=60) as http:
            assert http.get("/livez").status_code == 200
            _is_openai_error(http.get("/v1/models"), 401)
            r = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200 and r.json()["data"][0]["id"]
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port gets no answer
            httpx.get(url.replace("https://", "http://") + "/livez", timeout=10)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the server
            httpx.get(url + "/livez", timeout=10)
    finally:
        server.stop()


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
