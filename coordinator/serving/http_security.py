"""Guards of the HTTP API: an API key on every route, a Host check, TLS, closed CORS, a bound on bodies.

    edgeshard secret api-key --out api.key                       # once: a random key, mode 0600
    edgeshard serve ... --http 0.0.0.0:8000 --api-key-file api.key --tls-cert cert.pem --tls-key key.pem
    edgeshard serve ... --cors-origin https://chat.example.org   # browsers of that origin may call it

- API key (`--api-key-file FILE`, `$EDGESHARD_API_KEY`, or `--api-key KEY`): when set, every route wants
  `Authorization: Bearer KEY` (what the openai package and our SDK send) - /v1, /health, /docs,
  /v1/openapi.json, /metrics, the dashboard at /, and any route added later: the check is a middleware in
  front of the whole app, not a dependency each route must remember. Only `GET /livez` (200 `{"status":
  "alive"}`, nothing else) answers without it, for load balancers and systemd. The comparison is constant-
  time; a missing or wrong key is HTTP 401 in OpenAI's error shape (code `invalid_api_key`) and a log line
  with the client's address (rate limited). An empty key is an error, never "no authentication": `--api-key
  ""`, `EDGESHARD_API_KEY=""` and an empty or missing key file all stop the server before it starts.
- Beyond loopback the API refuses to start without a key (the choice: refuse, not make one and print it as
  Jupyter does - a printed key ends up in journals and scrollback). With a key but no TLS beyond loopback it
  warns that the key crosses the network in the clear; `--tls-cert/--tls-key` serve HTTPS (uvicorn's ssl).
- Host check (DNS rebinding): a web page cannot make a visitor's browser read a loopback API by pointing its
  own name at 127.0.0.1, because the browser still sends that name as `Host`. The API answers only Host
  names it is known by: loopback names, the address it is bound to, and `--allowed-host NAME` (repeatable);
  anything else is HTTP 400 `invalid_host`. Bound to a wildcard (0.0.0.0, ::) without --allowed-host, any
  Host passes - a key is then mandatory, and rebinding does not give a page the key.
- CORS is closed unless origins are listed: no CORS headers at all, so a web page on another origin cannot
  read answers (or spend the cluster) from a visitor's browser. Listed origins get exactly those.
- Request bodies are buffered up to `max_body_bytes` (4 MiB: far beyond any context window's worth of text)
  and refused with 413 beyond, before JSON parsing or tokenizing - and only after the key was checked, so a
  stranger cannot make the server buffer anything. Prompt length (400 context_length_exceeded) and queueing
  (429) are the engine's (engine.py).
"""

# No `from __future__ import annotations` here: FastAPI is imported lazily (the CLI imports this module at
# start) and the dataclass below is read at run time.
import argparse
import hmac
import ipaddress
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeshard.coordinator.errors import (
    AuthenticationError,
    BadRequestError,
    EdgeshardError,
    RequestTooLargeError,
    UserError,
)
from edgeshard.node.security.call_auth import RateLimitedLog
from edgeshard.node.security.cluster_key import ClusterKey

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("edgeshard.coordinator.http")

API_KEY_ENV = "EDGESHARD_API_KEY"
API_KEY_PREFIX = "esk-"
MAX_BODY_BYTES = 4 << 20
LIVENESS_PATH = "/livez"  # the one route without the key: says the process serves HTTP, nothing more
# The dashboard's page and its assets (serving/dashboard.py) load without the key: they hold no data (every
# figure comes from /v1/cluster and /metrics, behind the key), and the page must load to ask for the key.
PAGE_PATHS = ("/",)
PAGE_PREFIX = "/static/"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class HttpSecurity:
    """How the HTTP API guards itself (the serve/cluster flags, or LocalCluster's arguments)."""

    api_key: str | None = None  # None: no key needed (loopback only); "" is refused
    cors_origins: tuple[str, ...] = ()  # () : no CORS headers at all
    max_body_bytes: int = MAX_BODY_BYTES
    allowed_hosts: tuple[str, ...] = ()  # Host names beyond loopback and the bound address
    tls_cert: str | None = None  # PEM files: serve HTTPS
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key is empty; an empty key would mean no authentication. " + KEY_HELP)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together: give both files (PEM) or neither")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def __repr__(self) -> str:  # never print the key
        key = "set" if self.api_key else "none"
        return (
            f"HttpSecurity(api_key={key}, cors_origins={self.cors_origins}, max_body={self.max_body_bytes}, "
            f"allowed_hosts={self.allowed_hosts}, tls={self.tls})"
        )


KEY_HELP = (
    "Make a key with `edgeshard secret api-key --out api.key` and pass --api-key-file api.key "
    f"(or set {API_KEY_ENV}); clients send it as `Authorization: Bearer KEY`"
)


def new_api_key() -> str:
    """A random API key (256 bits), `esk-<base64url>`."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def add_http_security_args(p: argparse.ArgumentParser) -> None:
    """--api-key(-file), --cors-origin, --allowed-host, --tls-cert/--tls-key (serve and cluster)."""
    p.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="require `Authorization: Bearer KEY` on every route but /livez, KEY read from FILE "
        "(`edgeshard secret api-key --out FILE`); required to serve beyond loopback",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"the API key itself (prefer --api-key-file or ${API_KEY_ENV}: they stay out of `ps`)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages of ORIGIN call the API (repeatable; default: no CORS, closed)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name clients use for this server, beyond loopback names and the bound address "
        "(repeatable; guards against DNS rebinding)",
    )
    p.add_argument(
        "--tls-cert", type=Path, default=None, metavar="PEM", help="serve HTTPS with this certificate"
    )
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the certificate's private key")


def _read_key_file(path: Path) -> str:
    p = Path(path).expanduser()
    try:
        text = p.read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read the API key file {p}: {e.strerror}. {KEY_HELP}") from None
    if not text:
        raise UserError(f"the API key file {p} is empty; an empty key would mean no authentication")
    if ClusterKey.loose_permissions(p):
        log.warning("API key file %s is readable by other users; chmod 600 it", p)
    return text


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """The key the flags or the environment name; UserError for an empty one (never "no auth")."""
    key_file = getattr(args, "api_key_file", None)
    flag = getattr(args, "api_key", None)
    if key_file is not None and flag is not None:
        raise UserError("--api-key and --api-key-file contradict each other; choose one")
    if key_file is not None:
        return _read_key_file(key_file)
    if flag is not None:
        if not flag.strip():
            raise UserError(f'--api-key "" is empty; an empty key would mean no authentication. {KEY_HELP}')
        return flag.strip()
    if API_KEY_ENV in os.environ:
        env = os.environ[API_KEY_ENV].strip()
        if not env:
            raise UserError(
                f"{API_KEY_ENV} is set but empty; an empty key would mean no authentication. Unset it "
                f"for a loopback-only API without a key, or give it a key. {KEY_HELP}"
            )
        return env
    return None


def http_host_of(args: argparse.Namespace) -> str:
    """The host part of --http (loopback when absent), as `parse_http_address` in cli/serve.py reads it."""
    text = (getattr(args, "http", None) or "").strip()
    host = text.rpartition(":")[0] if ":" in text else ""
    return host.strip("[]") or "127.0.0.1"


def http_security_from_args(args: argparse.Namespace) -> HttpSecurity:
    """The HttpSecurity the flags (or $EDGESHARD_API_KEY) ask for, checked against the --http address: an
    empty key, a missing file, half of a TLS pair, or an API beyond loopback without a key is a UserError
    (before anything is loaded)."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not Path(path).expanduser().is_file():
            raise UserError(f"{flag} {path}: no such file")
    security = HttpSecurity(
        api_key=api_key_from_args(args),
        cors_origins=tuple(getattr(args, "cors_origin", None) or ()),
        allowed_hosts=tuple(h.strip().lower().rstrip(".") for h in getattr(args, "allowed_host", None) or ()),
        tls_cert=str(Path(cert).expanduser()) if cert is not None else None,
        tls_key=str(Path(key).expanduser()) if key is not None else None,
    )
    check_listen(http_host_of(args), security)
    return security


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, security: "HttpSecurity | None") -> None:
    """UserError when the API would listen beyond loopback without an API key."""
    if not is_loopback(host) and (security is None or not security.api_key):
        raise UserError(
            f"the HTTP API on {host or '0.0.0.0'} would be open to anyone who can reach it: beyond loopback "
            f"it needs an API key. {KEY_HELP}"
        )


def warn_if_open(host: str, security: "HttpSecurity | None", console) -> None:
    """Say so when the key crosses the network in the clear (beyond loopback, no TLS)."""
    if not is_loopback(host) and (security is None or not security.tls):
        console.print(
            f"[yellow]warning: the API on {host} is plain HTTP: the API key and every prompt cross the network "
            "unencrypted; pass --tls-cert/--tls-key (or put a TLS proxy in front)[/]",
            soft_wrap=True,
        )


def allowed_host_names(bound_host: str | None, security: "HttpSecurity") -> frozenset[str] | None:
    """The Host names the API answers (None: any - a wildcard bind without --allowed-host)."""
    wildcard = bound_host in (None, "", "0.0.0.0", "::")
    if wildcard and not security.allowed_hosts:
        return None
    names = set(LOOPBACK_NAMES) | set(security.allowed_hosts)
    if not wildcard:
        names.add(bound_host.strip("[]").lower())
    return frozenset(names)


def host_name(header: bytes) -> str:
    """The name part of a Host header (`[::1]:8000` -> `::1`, `Example.org.:80` -> `example.org`)."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


class Guard:
    """ASGI middleware in front of the whole app: Host check, then `/livez`, then the API key.

    In front of the app (not a route dependency), so every route - /docs, /v1/openapi.json, /health, and
    routes added later (/metrics) - is behind the key unless it is `/livez` or the dashboard's page and static
    assets (`PAGE_PATHS`: no data in them; the page asks for the key). A request refused here never reaches
    routing, body buffering or JSON parsing."""

    def __init__(self, app, api_key: str | None, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None
        self.hosts = hosts
        self.refusals = RateLimitedLog(logger=log)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "unknown client"
        if self.hosts is not None and host_name(headers.get(b"host", b"")) not in self.hosts:
            name = headers.get(b"host", b"").decode("latin-1")[:100]
            self.refusals.warn(
                peer, "host", "HTTP 400 from %s: Host %r is not one of this server's names", peer, name
            )
            err = BadRequestError(
                f"Host {name!r} is not a name of this server (a DNS-rebinding page?); start it with "
                "--allowed-host NAME for names clients really use",
                code="invalid_host",
            )
            await _send_error(send, err)
            return
        if scope["path"] == LIVENESS_PATH and scope.get("method") in ("GET", "HEAD"):
            await _send_json(send, 200, {"status": "alive"})
            return
        page = scope["path"] in PAGE_PATHS or scope["path"].startswith(PAGE_PREFIX)
        if page and scope.get("method") in ("GET", "HEAD"):  # the login form itself; no data
            await self.app(scope, receive, send)
            return
        if self.expected is not None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)):
                why = "wrong API key" if token else "no API key"
                method, path = scope.get("method", "?"), scope.get("path", "?")
                self.refusals.warn(peer, why, "HTTP 401 %s %s from %s: %s", method, path[:200], peer, why)
                err = AuthenticationError(
                    "Incorrect API key provided. Send it as `Authorization: Bearer KEY` (the openai client's "
                    "api_key)"
                    if token
                    else "You didn't provide an API key. Send it as `Authorization: Bearer KEY`"
                )
                await _send_error(send, err, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


async def _send_error(send, err: EdgeshardError, extra: list | None = None) -> None:
    await _send_json(send, err.status, err.to_dict(), extra)


async def _send_json(send, status: int, body: dict, extra: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra or ())})
    await send({"type": "http.response.body", "body": data})


def build_app(engine, security: "HttpSecurity | None" = None, host: str | None = "127.0.0.1") -> "FastAPI":
    """The API app of http_api.create_app behind the guards `security` asks for (None: defaults, no key).
    `host` is the address the server is bound to (for the Host check)."""
    from fastapi.middleware.cors import CORSMiddleware

    from edgeshard.coordinator.serving.http_api import create_app

    security = security or HttpSecurity()
    app = create_app(engine)
    # Starlette wraps in reverse order of adding: the last added is outermost. Request path:
    # CORS (listed origins only) -> Guard (Host, /livez, key) -> BodyLimit -> routes
    app.add_middleware(BodyLimit, limit=security.max_body_bytes)
    app.add_middleware(Guard, api_key=security.api_key, hosts=allowed_host_names(host, security))
    if security.cors_origins:  # outermost, so refusals (400, 401, 413) carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(security.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    return app


class BodyLimit:
    """ASGI middleware: buffers a request body up to `limit` bytes, answers 413 beyond (OpenAI's shape)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later messages (a disconnect) come from the client as usual

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        err = RequestTooLargeError(
            f"the request body exceeds {self.limit} bytes; send a shorter prompt or conversation"
        )
        body = json.dumps(err.to_dict()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
