"""`LocalCluster`: a whole edgeshard cluster on this machine, for notebooks, classrooms and tests.

    with LocalCluster(model="smollm2-135m", nodes=3) as cluster:
        print(cluster.client().chat("Hello!").text)

What runs where (chosen for notebooks): the N nodes are separate `edgeshard node` processes on 127.0.0.1, so
the model really is split across processes talking gRPC, exactly as across machines. The coordinator and its
HTTP server run in a background thread of *this* process (`http_server.BackgroundServer`): it only tokenizes and
moves token ids, starts in a second, needs no port handshake, and a notebook kernel can inspect it
(`cluster.engine`). `nodes=0` runs every layer in this process instead (no node processes).

Security: the node processes get an ephemeral cluster key (unless this process configured one, see
node/security/channels.py), so their gRPC traffic is TLS with membership tokens from the first run; `api_key`
makes the HTTP API want a bearer token.

No orphans: `stop()` runs on `with` exit, on errors while starting, and at interpreter exit (atexit); the node
processes also die with this process (parent-death signal and a parent watchdog, see `cluster.py`).
"""

from __future__ import annotations

import atexit
from functools import partial
from typing import Any


class LocalCluster:
    """N local node processes plus an OpenAI-compatible server in this process; `.url`, `.client()`."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        nodes: int = 3,
        quant: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int = 1,
        max_running: int = 8,
        max_queued: int = 32,
        verbose: bool = False,
        api_key: str | None = None,
        cors_origins: tuple[str, ...] = (),
    ) -> None:
        if nodes < 0:
            raise ValueError(f"nodes must be >= 0 (0: every layer in this process), got {nodes}")
        self.model, self.nodes, self.quant = model, nodes, quant
        self.host, self.port, self.threads = host, port, threads
        self.engine_kw = {"max_running": max_running, "max_queued": max_queued}
        self.verbose = verbose
        self.api_key = api_key  # the HTTP API wants it as a bearer token (None: open); client() sends it
        self.cors_origins = tuple(cors_origins)
        self.url: str | None = None
        self.processes = None  # cluster.LocalCluster: the node processes
        self.server = None  # http_server.BackgroundServer

    def start(self) -> LocalCluster:
        """Start the nodes, load the shards, start serving; everything started is stopped on failure."""
        from rich.console import Console

        from edgeshard.coordinator.sdk.local_nodes import LocalNodes as NodeProcesses
        from edgeshard.coordinator.serving.assemble import local_engine, peers_engine
        from edgeshard.coordinator.serving.http_security import HttpSecurity
        from edgeshard.coordinator.serving.http_server import BackgroundServer
        from edgeshard.node.weights.registry import resolve_model

        if self.server is not None:
            return self
        atexit.register(self.stop)
        try:
            path = resolve_model(self.model, progress=self.verbose)
            if self.nodes == 0:
                build = partial(local_engine, self.model, self.quant, self.threads, **self.engine_kw)
            else:
                # the nodes may open only files under their --model-dir: give them the model's own directory
                self.processes = NodeProcesses(self.nodes, model_dir=path.parent, threads=self.threads)
                addresses = self.processes.start()
                console = Console(stderr=True, quiet=not self.verbose)
                build = partial(
                    peers_engine,
                    addresses,
                    self.model,
                    self.quant,
                    console=console,
                    node_model=path.name,
                    **self.engine_kw,
                )
            self.server = BackgroundServer(
                build,
                self.host,
                self.port,
                "info" if self.verbose else "warning",
                http_security=HttpSecurity(api_key=self.api_key, cors_origins=self.cors_origins),
            )
            self.url = self.server.start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def engine(self):
        """The serving engine (in this process), for inspection."""
        return self.server.served.engine if self.server and self.server.served else None

    @property
    def plan(self) -> list[dict] | None:
        """Which node runs which layers."""
        return self.server.served.plan if self.server and self.server.served else None

    def client(self, **kwargs: Any):
        """A `Client` of this cluster (with its API key, if it has one)."""
        from edgeshard.coordinator.sdk.client import Client

        return Client(self._url(), **{"api_key": self.api_key, **kwargs})

    def async_client(self, **kwargs: Any):
        """An `AsyncClient` of this cluster (with its API key, if it has one)."""
        from edgeshard.coordinator.sdk.async_client import AsyncClient

        return AsyncClient(self._url(), **{"api_key": self.api_key, **kwargs})

    def _url(self) -> str:
        if self.url is None:
            raise RuntimeError("the cluster is not running; use `with LocalCluster(...)` or call start()")
        return self.url

    def stop(self) -> None:
        """Stop the server and the node processes (idempotent)."""
        atexit.unregister(self.stop)
        server, self.server, self.url = self.server, None, None
        processes, self.processes = self.processes, None
        try:
            if server is not None:
                server.stop()
        finally:
            if processes is not None:
                processes.__exit__(None, None, None)  # stops them and removes their log directory

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url or "stopped"
        return f"LocalCluster(model={self.model!r}, nodes={self.nodes}, {where})"
