"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI; http_server.py runs it with uvicorn).

    GET  /v1/models  /v1/models/{id}        the served model
    POST /v1/completions                     prompt -> text (JSON, or SSE with "stream": true)
    POST /v1/chat/completions                messages -> text (JSON, or SSE with "stream": true)
    GET  /v1/cluster[?max_age=S]             nodes, plan, per-stage timings, admission counters
    GET  /metrics                            Prometheus text format (metrics.py); guarded like /v1
    GET  /                                   the dashboard and chat page (dashboard.py, static/)
    GET  /health                             200 when a plan can run, else 503

Handlers are thin: request models and OpenAI response shapes are in `openai_shapes.py`; the engine decides.
Errors always have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. The API key, the Host
check and `/livez` are a middleware in front of this whole app (http_security.py `Guard`): every route here,
`/health` and routes added later included, is behind the key when one is set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeshard.coordinator.errors import BadRequestError, EdgeshardError, ModelNotFoundError
from edgeshard.coordinator.serving.dashboard import add_dashboard
from edgeshard.coordinator.serving.engine import Engine, Finished, Generation
from edgeshard.coordinator.serving.metrics import ClusterView, MetricsEndpoint
from edgeshard.coordinator.serving.openai_shapes import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    model_card,
    sse,
    validation_error,
)

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it, logs do


def create_app(engine: Engine, dependencies: Sequence[Any] = ()) -> FastAPI:
    """The FastAPI app serving `engine`; `dependencies` guard every /v1 route (auth plugs in here)."""
    app = FastAPI(
        title="edgeshard",
        summary="OpenAI-compatible API of an edgeshard cluster",
        openapi_url="/v1/openapi.json",
        docs_url="/docs",
    )
    app.state.engine = engine
    # /v1/cluster, /metrics and every open dashboard share one read of the nodes at a time
    view = ClusterView(engine.cluster_info)
    metrics = MetricsEndpoint(engine.metrics, view)
    v1 = APIRouter(prefix="/v1", dependencies=list(dependencies))

    @v1.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(engine)]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        engine.check_model(model_id)
        return model_card(engine)

    async def answer(body, request: Request, events, respond) -> Response:
        """One generation: SSE events when streaming, else the collected response (nothing if the client left)."""
        gen = engine.submit(body.to_generation())
        if body.stream:
            return EventStream(events(engine, gen, body.include_usage), gen)
        result = await _collect_unless_gone(request, gen)
        return JSONResponse(respond(engine, gen, result)) if result else Response(status_code=CLIENT_CLOSED)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer(body, request, _completion_events, completion_response)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await answer(body, request, _chat_events, chat_response)

    @v1.get("/cluster")
    async def cluster(max_age: float = Query(0.0, ge=0.0, le=60.0)) -> JSONResponse:
        # max_age: seconds old a snapshot may be (the dashboard polls with 0.5: thirty pages, two reads a second)
        return JSONResponse(await view.get(max_age))

    @app.get("/metrics", dependencies=list(dependencies), include_in_schema=False)
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok", "model": engine.model_name, **engine.stats()}
        try:
            engine.check_available()
        except EdgeshardError as e:
            unavailable = {
                **body,
                "status": "unavailable",
                "reason": e.message,
                **e.to_dict(),
            }  # + OpenAI shape
            return JSONResponse(unavailable, status_code=e.status)
        return JSONResponse(body)

    app.include_router(v1)
    add_dashboard(app)
    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgeshardError)
    async def edgeshard_error(request: Request, e: EdgeshardError) -> JSONResponse:
        return JSONResponse(e.to_dict(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        err = validation_error(e.errors())
        return JSONResponse(err.to_dict(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            err: EdgeshardError = ModelNotFoundError(
                f"no route {request.method} {request.url.path}; see /docs", code="not_found"
            )
        elif e.status_code < 500:
            err = BadRequestError(str(e.detail), code=None, status=e.status_code)
        else:
            err = EdgeshardError(str(e.detail), status=e.status_code)
        return JSONResponse(err.to_dict(), status_code=err.status, headers=getattr(e, "headers", None))


class EventStream(StreamingResponse):
    """An SSE response that stops its generation however the response ends (done, error, disconnect)."""

    def __init__(self, events: AsyncIterator[str], generation: Generation) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette leaves the body iterator suspended when the client goes away: close it ourselves
            self.generation.cancel()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


async def _stream(
    gen: Generation, piece: Callable[[str], dict], finish: Callable[[Finished], list[dict]]
) -> AsyncIterator[str]:
    try:
        async for event in gen:
            for chunk in finish(event) if isinstance(event, Finished) else [piece(event.text)]:
                yield sse(chunk)
    except EdgeshardError as e:  # headers are sent: the error becomes an event (the openai client raises it)
        yield sse(e.to_dict())
        return
    yield "data: [DONE]\n\n"


def _chat_events(engine: Engine, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[str]:
        yield sse(chat_chunk(engine, gen, {"role": "assistant", "content": ""}))  # OpenAI opens with the role
        async for line in _stream(
            gen,
            lambda text: chat_chunk(engine, gen, {"content": text}),
            lambda f: (
                [chat_chunk(engine, gen, {}, f.finish_reason)]
                + ([chat_chunk(engine, gen, None, usage=f.usage)] if include_usage else [])
            ),
        ):
            yield line

    return events()


def _completion_events(engine: Engine, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
    return _stream(
        gen,
        lambda text: completion_chunk(engine, gen, text),
        lambda f: (
            [completion_chunk(engine, gen, "", f.finish_reason)]
            + ([completion_chunk(engine, gen, None, usage=f.usage)] if include_usage else [])
        ),
    )


async def _collect_unless_gone(request: Request, gen: Generation):
    """The whole completion, or None when the client disconnected first (the generation is then stopped)."""
    collect = asyncio.ensure_future(gen.collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if collect.done():
            return collect.result()
        gen.cancel()
        return None
    finally:
        gone.cancel()
        collect.cancel()


async def _disconnected(request: Request) -> None:
    # the body has been read, so the next ASGI message is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass
