"""`edgeshard run --peers ... --json` survives a node killed mid-generation: with no spare, the two survivors
re-split the layers, load them, replay the sequence and finish it; `recoveries` in the summary says so.

f32 shards: moving a layer boundary is bit-exact only in f32 (bf16/int4 round the residual stream where a
stage hands over, node/model.py), and an f32 split generates exactly what one process does (test_pipeline).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch

from edgeshard.coordinator.cli import prompt_ids
from edgeshard.coordinator.cluster import LocalCluster
from edgeshard.coordinator.generate import AsyncLocalPipeline, Sequence, generate
from edgeshard.node.checkpoint import open_checkpoint
from edgeshard.node.config import ShardSpec
from edgeshard.node.executor import LocalPipeline, ShardExecutor
from edgeshard.node.loader import load_stage
from edgeshard.node.sampling import SamplingParams
from edgeshard.node.tokenizer import Tokenizer

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


def test_run_json_survivors_resplit_and_match_one_process(smollm2_path):
    want = local_tokens(smollm2_path)
    assert len(want) > 20  # long enough to be killed in the middle
    with LocalCluster(3, model_dir=smollm2_path.parent, name="cli", node_args=["--no-benchmark"]) as cluster:
        cmd = [
            *(sys.executable, "-m", "edgeshard.coordinator.cli", "run", "--model", str(smollm2_path)),
            *("--peers", ",".join(cluster.addresses), "--quant", "f32", "--prompt", PROMPT, "--chat"),
            *("--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json"),
            *cluster.security_args(),
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
    assert event["action"] == "re-split the layers evenly over 2 node(s)"
    assert [(s["start_layer"], s["end_layer"]) for s in event["plan"]] == [(0, 15), (15, 30)]
    assert event["load_ms"] > 0 and event["pause_ms"] >= event["load_ms"] + event["replay_ms"]
    assert "recovered in" in err.decode()  # the one log line a user sees
