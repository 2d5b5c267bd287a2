"""End to end over real node processes and real ports: 1, 2 and 3 nodes generate exactly what --local does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch

from edgeshard.coordinator.cli.run import prompt_ids
from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline, Sequence, generate
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.loader import load_stage

pytestmark = pytest.mark.slow
torch.set_num_threads(1)  # the nodes run 1 thread each; the reference must too (same kernels, same sums)

MAX_TOKENS = 48
# f32 shards: a bf16/int4 stage rounds its f32 residual stream to bf16 where it hands over to the next stage
# (node/model/decoder.py, by design: half the bytes on the wire), so only f32 splits are bit-identical to one stage.
QUANT = "f32"
PROMPTS = [  # (text, chat)
    ("The capital of France is", False),
    ("def fibonacci(n):", False),
    ("What is gravity? Answer briefly.", True),
    ("Write a haiku about the sea.", True),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from edgeshard.node.weights.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [prompt_ids(tokenizer, text, chat) for text, chat in PROMPTS]


GREEDY = SamplingParams()


async def _generate(pipeline, ids: list[int], sampling: SamplingParams = GREEDY) -> list[int]:
    # no stop tokens: always MAX_TOKENS tokens, so every position is compared
    seq = Sequence(ids, sampling, MAX_TOKENS)
    return [t async for t in generate(pipeline, seq)]


@pytest.fixture(scope="module")
def local_tokens(smollm2_path, prompts):
    """The reference: every layer in this process (the `--local` path), in the same format as the nodes."""
    ckpt = open_checkpoint(smollm2_path)
    stage = load_stage(ckpt, ShardSpec.full(ckpt.config.num_hidden_layers), QUANT)
    pipe = AsyncLocalPipeline(LocalPipeline([ShardExecutor(stage)]))

    async def run():
        greedy = [await _generate(pipe, ids) for ids in prompts]
        sampled = await _generate(
            pipe, prompts[2], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
        )
        return greedy, sampled

    return asyncio.run(run())


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
def test_nodes_match_local_token_for_token(node_cluster, smollm2_path, prompts, local_tokens, n_nodes):
    greedy, sampled = local_tokens

    async def run():
        d = await deploy(node_cluster.addresses[:n_nodes], smollm2_path.name, 30, QUANT)
        assert [(p["start_layer"], p["end_layer"]) for p in d.plan][-1][1] == 30
        pipe = await d.pipeline()
        try:
            got = [await _generate(pipe, ids) for ids in prompts]
            seeded = None
            if n_nodes == 3:  # sampling parameters and the seed travel with the session to the last node
                seeded = await _generate(
                    pipe, prompts[2], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
                )
            return got, seeded
        finally:
            await pipe.aclose()
            await d.close()

    got, seeded = asyncio.run(run())
    for ids, want, have in zip(prompts, greedy, got, strict=True):
        assert have == want, f"{n_nodes} nodes diverge from --local on prompt {ids[:8]}..."
    if seeded is not None:
        assert seeded == sampled


def test_concurrent_sessions_share_the_ring(node_cluster, smollm2_path, prompts, local_tokens):
    greedy, _ = local_tokens

    async def run():
        d = await deploy(node_cluster.addresses, smollm2_path.name, 30, QUANT)
        pipe = await d.pipeline()
        try:
            return await asyncio.gather(*(_generate(pipe, ids) for ids in prompts))
        finally:
            await pipe.aclose()
            await d.close()

    assert asyncio.run(run()) == greedy


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgeshard.coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_cli_run_peers_matches_local(node_cluster, smollm2_path):
    common = [
        "--model",
        str(smollm2_path),
        "--prompt",
        "Name three colors.",
        "--chat",
        "--max-tokens",
        "48",
        "--temperature",
        "0",
        "--quant",
        QUANT,
        "--json",
    ]
    remote = _cli("run", "--peers", ",".join(node_cluster.addresses), *common, *node_cluster.security_args())
    assert remote.returncode == 0, remote.stderr
    local = _cli("run", "--local", "--threads", "1", *common)
    assert local.returncode == 0, local.stderr
    r, loc = (
        json.loads(remote.stdout.strip().splitlines()[-1]),
        json.loads(local.stdout.strip().splitlines()[-1]),
    )
    assert r["tokens"] == loc["tokens"] and r["text"] == loc["text"]
    assert [(p["start_layer"], p["end_layer"]) for p in r["plan"]] == [(0, 10), (10, 20), (20, 30)]
    assert [p["address"] for p in r["plan"]] == node_cluster.addresses
