"""`serve --discover`: 503 with the planner's reason while no plan can run, serving once nodes appear.

mDNS runs on 127.0.0.1 only, under a cluster name no one else uses."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from edgeshard.coordinator.placement.gather import PlacementOptions
from edgeshard.coordinator.sdk import Client, ServerUnavailableError
from edgeshard.coordinator.sdk.local_nodes import LocalNodes as NodeProcesses
from edgeshard.coordinator.serving.assemble import discovered_engine
from edgeshard.coordinator.serving.http_server import BackgroundServer
from edgeshard.node.security.channels import for_local_nodes


def _opts(cluster: str) -> PlacementOptions:
    return PlacementOptions(
        timeout=1.0, mdns_interfaces=("127.0.0.1",), cluster=cluster, context=1024, sessions=2
    )


class AdvertisedNodes(NodeProcesses):
    """Local node processes that announce themselves on mDNS (127.0.0.1 only) in one cluster."""

    def __init__(self, n: int, model_dir: Path, cluster: str) -> None:
        super().__init__(n, model_dir=model_dir, threads=1, name=f"disc-{cluster[-6:]}-")
        self.cluster = cluster

    def command(self, i: int) -> list[str]:
        cmd = [a for a in super().command(i) if a != "--no-advertise"]
        return cmd + ["--mdns-interface", "127.0.0.1", "--cluster", self.cluster]


@pytest.fixture
def discover_server():
    cluster = f"test-serve-{uuid.uuid4().hex[:8]}"
    for_local_nodes()  # this process's cluster key (ephemeral unless configured): the nodes below get it too
    server = BackgroundServer(
        lambda: discovered_engine("smollm2-135m", None, _opts(cluster), retry_s=0.5, max_running=2)
    )
    server.start()
    yield server, cluster
    server.stop()


def test_no_plan_is_503_with_the_reason(discover_server):
    server, _ = discover_server
    with Client(server.url) as client:
        assert client.models()[0]["id"] == "smollm2-135m"  # the model is known before any node is
        with pytest.raises(ServerUnavailableError, match="no plan can run"):
            client.chat("Hi", max_tokens=2)
        with pytest.raises(ServerUnavailableError):
            client.health()


@pytest.mark.slow
def test_serves_once_nodes_appear(discover_server, smollm2_path):
    server, cluster = discover_server
    with AdvertisedNodes(2, Path(smollm2_path).parent, cluster), Client(server.url) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                client.health()
                break
            except ServerUnavailableError:
                time.sleep(0.5)
        result = client.chat("Name a color.", max_tokens=6, temperature=0)
        assert result.text and result.usage.completion_tokens > 0
        info = client.cluster_info()
        assert len(info["nodes"]) >= 1 and info["prediction"]["stages"]
        assert info["context_length"] == 1024  # what the plan budgeted KV memory for
