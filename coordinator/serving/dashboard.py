"""The classroom view: a web page at `/` that draws the ring and chats with the model (assets in static/).

The page is plain HTML, CSS and JavaScript shipped inside the package: no CDN, no build step, nothing fetched
from outside the server (a Content-Security-Policy of 'self' makes the browser hold the page to that). It
polls `GET /v1/cluster` once a second and streams chat answers from `POST /v1/chat/completions`, both with
`fetch`, so an API key goes along as `Authorization: Bearer KEY` (EventSource cannot send headers).

The page itself holds no data and is served without a key: when the server wants one, the page asks for it
(a login form; kept in the tab's sessionStorage) and every figure it shows comes from the /v1 routes, which
refuse it without the key exactly as they refuse any other client.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

ASSETS = {  # file -> media type; nothing else is served
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    """The bytes of one shipped asset (read once)."""
    return resources.files("edgeshard.coordinator.serving").joinpath("static", name).read_bytes()


def add_dashboard(app: FastAPI) -> None:
    """Serve the page at `/` and its assets at `/static/NAME`."""

    def send(name: str) -> Response:
        return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return send("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in ASSETS:
            return Response(status_code=404)
        return send(name)
