"""Guards of the HTTP API: an optional API key, closed CORS, and a bound on request bodies.

    edgeshard serve ... --http 0.0.0.0:8000 --api-key KEY        # or EDGESHARD_API_KEY=KEY
    edgeshard serve ... --cors-origin https://chat.example.org   # browsers of that origin may call it

- API key: every /v1 route wants `Authorization: Bearer KEY` (what the openai package and our SDK send).
  The comparison is constant-time (`hmac.compare_digest`); a missing or wrong key is HTTP 401 in OpenAI's
  error shape (code `invalid_api_key`) and a log line with the client's address (rate limited). /health stays
  open, so load balancers and `doctor` can probe it.
- CORS is closed unless origins are listed: no CORS headers at all, so a web page on another origin cannot
  read answers (or spend the cluster) from a visitor's browser. Listed origins get exactly those.
- Request bodies are buffered up to `max_body_bytes` (4 MiB: far beyond any context window's worth of text)
  and refused with 413 beyond, before JSON parsing or tokenizing. Prompt length (400
  context_length_exceeded) and queueing (429) are the engine's (engine.py).
"""

# No `from __future__ import annotations` here: FastAPI reads the dependency's `request: Request` annotation,
# which must be the class itself, and fastapi is imported lazily (the CLI imports this module at start).
import argparse
import hmac
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeshard.coordinator.errors import AuthenticationError, RequestTooLargeError
from edgeshard.node.security.call_auth import RateLimitedLog

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("edgeshard.coordinator.http")

API_KEY_ENV = "EDGESHARD_API_KEY"
MAX_BODY_BYTES = 4 << 20


@dataclass(frozen=True)
class HttpSecurity:
    """How the HTTP API guards itself (the serve/cluster flags, or LocalCluster's arguments)."""

    api_key: str | None = None  # None: no key needed
    cors_origins: tuple[str, ...] = ()  # () : no CORS headers at all
    max_body_bytes: int = MAX_BODY_BYTES

    def __repr__(self) -> str:  # never print the key
        key = "set" if self.api_key else "none"
        return (
            f"HttpSecurity(api_key={key}, cors_origins={self.cors_origins}, max_body={self.max_body_bytes})"
        )


def add_http_security_args(p: argparse.ArgumentParser) -> None:
    """--api-key and --cors-origin (serve and cluster)."""
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}; the environment keeps it "
        "out of `ps`)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages of ORIGIN call the API (repeatable; default: no CORS, closed)",
    )


def http_security_from_args(args: argparse.Namespace) -> HttpSecurity:
    """The HttpSecurity the flags (or $EDGESHARD_API_KEY) ask for."""
    key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    return HttpSecurity(api_key=key, cors_origins=tuple(getattr(args, "cors_origin", None) or ()))


def api_key_dependency(api_key: str):
    """A FastAPI dependency refusing requests without `Authorization: Bearer <api_key>` (401)."""
    from fastapi import Depends, Request

    expected = api_key.encode()
    refusals = RateLimitedLog(logger=log)

    async def require_api_key(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected):
            return
        client = f"{request.client.host}:{request.client.port}" if request.client else "unknown client"
        why = "no API key" if not token else "wrong API key"
        refusals.warn(
            client, why, "HTTP 401 %s %s from %s: %s", request.method, request.url.path, client, why
        )
        raise AuthenticationError(
            "Incorrect API key provided. Send it as `Authorization: Bearer KEY` (the openai client's api_key)"
            if token
            else "You didn't provide an API key. Send it as `Authorization: Bearer KEY`"
        )

    return Depends(require_api_key)


def build_app(engine, security: "HttpSecurity | None" = None) -> "FastAPI":
    """The API app of http_api.create_app with the guards `security` asks for (None: defaults, no key)."""
    from fastapi.middleware.cors import CORSMiddleware

    from edgeshard.coordinator.serving.http_api import create_app

    security = security or HttpSecurity()
    deps = [api_key_dependency(security.api_key)] if security.api_key else []
    app = create_app(engine, dependencies=deps)
    app.add_middleware(BodyLimit, limit=security.max_body_bytes)
    if security.cors_origins:  # added last: outermost, so refusals (401, 413) carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(security.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    return app


def warn_if_open(host: str, security: "HttpSecurity | None", console) -> None:
    """Say so when the API listens beyond loopback without an API key."""
    if (security is None or not security.api_key) and not host.startswith(("127.", "::1", "localhost")):
        console.print(
            f"[yellow]warning: the API on {host} needs no key: anyone who can reach it can use the cluster; "
            f"pass --api-key (or set {API_KEY_ENV})[/]",
            soft_wrap=True,
        )


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
