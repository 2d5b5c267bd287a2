"""Running the HTTP API: in the foreground (`run_server`, the CLI) or in a background thread (`BackgroundServer`).

`BackgroundServer` serves in a daemon thread with its own event loop (tests, notebooks, the SDK's
`LocalCluster`). The build function runs inside that loop because gRPC channels belong to the loop that made
them; the coordinator does no model compute on the remote path (only tokenizing), so a thread is enough.
Sockets are bound before serving, so port 0 works and the caller knows the port at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI

from edgeshard.coordinator.serving.http_security import HttpSecurity, build_app, check_listen, warn_if_open

if TYPE_CHECKING:
    from edgeshard.coordinator.serving.assemble import Served


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one); binding first lets the caller know the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); is the port in use?") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve_http(
    app: FastAPI,
    sock: socket.socket,
    log_level: str = "info",
    on_server=None,
    security: HttpSecurity | None = None,
) -> None:
    """Serve `app` on a bound socket until the server is told to exit (SIGINT/SIGTERM in the main thread);
    HTTPS when `security` names a certificate and key.

    `on_server(server)` receives the uvicorn.Server, so a caller in another thread can stop it with
    `server.should_exit = True`. A stop signal makes this return normally, so the caller frees the pipeline.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down, which would cut our cleanup short (SIGTERM
            # kills the process outright): the signal has done its job once serving stops
            getattr(self, "_captured_signals", []).clear()

    tls = {}
    if security is not None and security.tls:
        tls = {"ssl_certfile": security.tls_cert, "ssl_keyfile": security.tls_key}
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5, **tls)
    server = Server(config)
    if on_server is not None:
        on_server(server)
    await server.serve(sockets=[sock])


async def run_server(
    served: Served,
    sock: socket.socket,
    console=None,
    log_level: str = "info",
    http_security: HttpSecurity | None = None,
) -> int:
    """Serve HTTP on `sock` (see `bind`: bind before loading, so a busy port fails fast) in the foreground until
    SIGINT/SIGTERM, then free the engine and pipeline. `http_security`: API key, CORS (http_security.py)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    host, port = sock.getsockname()[:2]
    scheme = "https" if http_security is not None and http_security.tls else "http"
    try:
        check_listen(host, http_security)  # (the CLI checked before loading; this guards other callers)
        console.print(
            f"[green]edgeshard serving {served.engine.model_name}[/] at {scheme}://{_url_host(host)}:{port}/v1 "
            "(OpenAI-compatible; GET /v1/cluster for the plan). Ctrl-C stops.",
            soft_wrap=True,  # one line, so scripts can find the URL
        )
        warn_if_open(host, http_security, console)
        app = build_app(served.engine, http_security, host)
        await serve_http(app, sock, log_level, security=http_security)
    finally:
        await served.engine.aclose()
        await served.close()
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class BackgroundServer:
    """The HTTP API in a daemon thread with its own event loop; `start()` returns the URL once it serves."""

    def __init__(
        self,
        build: Callable[[], Awaitable[Served]],
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        http_security: HttpSecurity | None = None,
    ) -> None:
        self.build, self.host, self.port, self.log_level = build, host, port, log_level
        self.http_security = http_security  # API key, CORS origins (None: no key, CORS closed)
        self.url: str | None = None
        self.served: Served | None = None
        self._server = None  # the uvicorn.Server, once serving
        self._stop = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 600.0) -> str:
        """Build the engine (in the server's loop) and start serving; raises what the build raised (and
        UserError, before binding anything, for an API beyond loopback without a key)."""
        check_listen(self.host, self.http_security)
        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(sock),), daemon=True, name=f"edgeshard-http-{self.port}"
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"the edgeshard server did not start within {timeout:.0f} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        scheme = "https" if self.http_security is not None and self.http_security.tls else "http"
        self.url = f"{scheme}://{_url_host(self.host)}:{self.port}"
        return self.url

    async def _main(self, sock) -> None:
        try:
            self.served = await self.build()
        except BaseException as e:
            sock.close()
            self._error = e
            self._ready.set()
            return
        try:
            if not self._stop:
                self._ready.set()
                app = build_app(self.served.engine, self.http_security, self.host)
                await serve_http(app, sock, self.log_level, self._on_server, self.http_security)
        finally:
            sock.close()
            self._ready.set()
            await self.served.engine.aclose()
            await self.served.close()

    def _on_server(self, server) -> None:
        self._server = server
        if self._stop:
            server.should_exit = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving, free the pipeline, and join the thread (idempotent)."""
        self._stop = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout)
