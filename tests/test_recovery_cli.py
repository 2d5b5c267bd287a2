"""The user-facing paths survive a node killed mid-generation.

`edgeshard run --peers ... --json`: with no spare, the two survivors re-split the layers, load them, replay
the sequence and finish it; `recoveries` in the summary says so. f32 shards: moving a layer boundary is
bit-exact only in f32 (bf16/int4 round the residual stream where a stage hands over, node/model/decoder.py), and an
f32 split generates exactly what one process does (test_pipeline).

`serve --discover` over HTTP: the planner re-places the layers over the nodes mDNS knows (127.0.0.1 only, a
cluster name no one else uses), and /v1/cluster reports the recovery.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import torch

from edgeshard.coordinator.cli.run import prompt_ids
from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline, Sequence, generate
from edgeshard.coordinator.placement.gather import PlacementOptions
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.loader import load_stage
from edgeshard.node.weights.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
torch.set_num_threads(1)  # as the nodes: the same kernels, the same sums

PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."
MAX_TOKENS = 64


def local_tokens(path) -> list[int]:
    """The uninterrupted reference: every layer in this process, f32, stopping where `run` stops."""
    tokenizer = Tokenizer.from_checkpoint(path)
    ckpt = open_checkpoint(path)
    stage = load_stage(ckpt, ShardSpec.full(ckpt.config.num_hidden_layers), "f32")
    seq = Sequence(
        prompt_ids(tokenizer, PROMPT, True),
        SamplingParams(),
        MAX_TOKENS,
        frozenset(tokenizer.stop_token_ids),
    )

    async def run():
        return [t async for t in generate(AsyncLocalPipeline(LocalPipeline([ShardExecutor(stage)])), seq)]

    return asyncio.run(run())


@pytest.mark.parametrize("layers", [None, "10,10,10"])
def test_run_json_survivors_resplit_and_match_one_process(smollm2_path, layers):
    """Without --layers the two survivors split evenly; with --layers (a planned ring) they re-split over
    both survivors as the cost model predicts best (before, the planner put all 30 layers on one)."""
    want = local_tokens(smollm2_path)
    assert len(want) > 20  # long enough to be killed in the middle
    with LocalNodes(3, model_dir=smollm2_path.parent, name="cli", node_args=["--no-benchmark"]) as cluster:
        cmd = [
            *(sys.executable, "-m", "edgeshard.coordinator.cli", "run", "--model", str(smollm2_path)),
            *("--peers", ",".join(cluster.addresses), "--quant", "f32", "--prompt", PROMPT, "--chat"),
            *("--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json"),
            *cluster.security_args(),
            *(("--layers", layers) if layers else ()),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            first = os.read(proc.stdout.fileno(), 64)  # the text has started: the ring is generating
            cluster.procs[1].kill()  # the middle node, mid-generation
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err.decode()
    summary = json.loads((first + out).decode().strip().splitlines()[-1])
    assert summary["tokens"] == want
    (event,) = summary["recoveries"]
    assert event["outcome"] == "recovered" and cluster.addresses[1] in event["nodes"][0]
    survivors = {cluster.addresses[0], cluster.addresses[2]}
    assert {s["address"] for s in event["plan"]} == survivors  # every survivor holds layers
    if layers is None:
        assert event["action"] == "re-split the layers evenly over 2 node(s)"
        assert [(s["start_layer"], s["end_layer"]) for s in event["plan"]] == [(0, 15), (15, 30)]
    else:
        assert event["action"] == "re-split the layers over all 2 live node(s)"
        assert event["plan"][0]["start_layer"] == 0 and event["plan"][-1]["end_layer"] == 30
    assert event["load_ms"] > 0 and event["pause_ms"] >= event["load_ms"] + event["replay_ms"]
    assert event["resumed_ms"] >= event["pause_ms"] >= event["probe_ms"]  # the failed call's next result
    assert "recovered in" in err.decode()  # the one log line a user sees


class AdvertisedNodes(LocalNodes):
    """Local nodes that announce themselves on mDNS, on 127.0.0.1 only, in one cluster."""

    def __init__(self, n: int, model_dir, cluster: str) -> None:
        super().__init__(n, model_dir=model_dir, name=f"adv-{cluster[-6:]}-")
        self.cluster = cluster

    def command(self, i: int) -> list[str]:
        cmd = [a for a in super().command(i) if a != "--no-advertise"]
        return cmd + ["--mdns-interface", "127.0.0.1", "--cluster", self.cluster]


def test_serve_discover_replans_over_the_nodes_mdns_knows(smollm2_path):
    from edgeshard.coordinator.sdk import Client, ServerUnavailableError
    from edgeshard.coordinator.serving.assemble import discovered_engine
    from edgeshard.coordinator.serving.http_server import BackgroundServer
    from edgeshard.node.security.channels import for_local_nodes

    cluster = f"test-recovery-{uuid.uuid4().hex[:8]}"
    opts = PlacementOptions(timeout=1.0, mdns_interfaces=("127.0.0.1",), cluster=cluster, context=1024)
    for_local_nodes()  # this process's cluster key: the nodes below get it too
    server = BackgroundServer(
        lambda: discovered_engine("smollm2-135m", None, opts, retry_s=0.5, max_running=1)
    )
    server.start()
    try:
        with AdvertisedNodes(3, smollm2_path.parent, cluster) as nodes, Client(server.url) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.health()
                    break
                except ServerUnavailableError:
                    assert time.monotonic() < deadline, "no plan within 2 minutes"
                    time.sleep(0.5)
            plan = client.cluster_info()["plan"]
            victim = nodes.addresses.index(plan[0]["address"])  # the first stage (maybe the only one)
            stream = client.chat(PROMPT, stream=True, max_tokens=48, temperature=0)
            pieces = []
            for piece in stream:
                if not pieces:
                    nodes.procs[victim].kill()
                pieces.append(piece)
            assert stream.result.usage.completion_tokens > 1 and "".join(pieces)
            recovery = client.cluster_info()["recovery"]
            (event,) = recovery["recoveries"]
            assert event["outcome"] == "recovered" and nodes.addresses[victim] in event["nodes"][0]
            assert recovery["state"] == "serving" and nodes.addresses[victim] not in {
                s["address"] for s in event["plan"]
            }
            assert client.chat("Name a color.", max_tokens=4, temperature=0).text  # and it goes on serving
    finally:
        server.stop()
