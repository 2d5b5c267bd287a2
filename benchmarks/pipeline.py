"""Pipeline benchmark: one process (`--local`) against 2 and 3 loopback nodes, on the demo model.

Every stage runs with the same torch threads (1 by default), so the comparison isolates what the ring costs:
messages, serialization, and Python per token. Decode of one sequence is serial around the ring, so the target
is that 3 nodes keep >= 0.9x the single-process decode rate.

    python benchmarks/pipeline.py                  # local, 2 and 3 nodes; 64 tokens, 5 runs each
    python benchmarks/pipeline.py --nodes 1,2,3 --tokens 128 --runs 9
    python benchmarks/pipeline.py --quick          # CI smoke: 16 tokens, 1 run
    python benchmarks/pipeline.py --feed 4,1,0     # token feed, results in 4s / one by one / no feed
    python benchmarks/pipeline.py --model gemma3-270m --nodes 3
    python benchmarks/pipeline.py --model random-1.5b --nodes 3   # a random-weight 1.59B Q4_0 (bigmodel.py)

What the ring costs per token is about fixed (a gRPC message and a wake-up per hop), so the ratio depends on
the model's compute per token: the 135M demo model (~7 ms a token here) is the worst case; `random-<size>`
writes a random-weight Llama-shaped Q4_0 GGUF of benchmarks/bigmodel.py's sizes into a temporary directory
(timing only: its tokens mean nothing), the users' case of a model no single board holds.

All configurations are started first and their runs interleaved, so load from other work on the machine
hits them alike. Reported per configuration (median over runs): ttft_ms (prompt in, first token out), decode tok/s (tokens after
the first), step_ms (one decode token's round trip), compute_ms (sum over the stages of their forward time per
step, from the nodes' counters), and hop_ms = (step_ms - compute_ms) / hops, with hops = nodes + 1 messages per
token (coordinator -> node 1 -> ... -> node N -> coordinator), or nodes with the direct token feed (the last node
sends the token to node 1 itself; docs/pipeline.md). `fed` is the share of decode steps the last node fed.
Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline, Sequence, generate
from edgeshard.coordinator.pipeline.remote import RemotePipeline
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.loader import load_stage

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.json"
# A fixed prompt of token ids (a chat turn of SmolLM2), so every configuration prefills the same 30 tokens.
PROMPT = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3717,
    7018,
    2,
    198,
    1,
    4093,
    198,
    1780,
    314,
    260,
    3458,
    282,
    4649,
    47,
    2,
    198,
    1,
    520,
    9531,
    198,
]


class Config:
    """One configuration under test: a started pipeline and a way to read its stages' counters."""

    def __init__(self, name: str, pipeline, stats, hops: int = 0) -> None:
        self.name, self.pipeline, self.stats, self.hops = name, pipeline, stats, hops
        self.ttft: list[float] = []
        self.rates: list[float] = []
        self.snapshots: dict[str, list] = {}

    async def generate(self, tokens: int) -> Sequence:
        seq = Sequence(PROMPT, SamplingParams(), tokens)  # no stop ids: always `tokens` tokens
        async for _ in generate(self.pipeline, seq):
            pass
        return seq


async def measure(configs: list[Config], tokens: int, runs: int) -> dict[str, dict]:
    """Median TTFT and decode rate per configuration, runs interleaved (A B C A B C ...).

    Interleaving matters on a shared machine: load that comes and goes hits every configuration alike
    instead of whichever ran during the busy minute. Stage counters cover prefill and decode alike, so
    prefill-only runs (1 token) are measured too and subtracted: the remainder is the decode steps' cost.
    """
    for c in configs:
        await c.generate(8)  # warm-up: first calls allocate caches and pick kernels
    # snapshots: at "t0", "t1" after the prefill-only runs, "t2" after the full runs
    for phase in ("t0", "t1", "t2"):
        for c in configs:
            c.snapshots[phase] = await c.stats()
        if phase == "t2":
            break
        for _ in range(runs):
            for c in configs:
                seq = await c.generate(1 if phase == "t0" else tokens)
                if phase == "t1":  # the full runs
                    c.ttft.append(seq.ttft_s)
                    c.rates.append(seq.decode_tok_per_s)
    out = {}
    for c in configs:
        s0, s1, s2 = c.snapshots["t0"], c.snapshots["t1"], c.snapshots["t2"]
        steps = runs * (tokens - 1)

        def per_step(field: str, s0=s0, s1=s1, s2=s2, steps=steps) -> list[float]:
            return [
                ((getattr(c2, field) - getattr(c1, field)) - (getattr(c1, field) - getattr(c0, field)))
                / steps
                for c0, c1, c2 in zip(s0, s1, s2, strict=True)
            ]

        r = {"ttft_ms": statistics.median(c.ttft) * 1e3, "decode_tok_s": statistics.median(c.rates)}
        r["step_ms"] = 1e3 / r["decode_tok_s"]
        r["compute_ms"] = sum(per_step("compute_ms"))
        r["node_compute_ms"] = [round(x, 3) for x in per_step("compute_ms")]
        r["node_network_ms"] = [round(x, 3) for x in per_step("network_ms")]
        hops = c.hops
        r["hops"] = hops
        r["fed"] = round(per_step("fed")[-1], 3) if c.name != "local" else 0.0
        r["hop_ms"] = (r["step_ms"] - r["compute_ms"]) / hops if hops else 0.0
        out[c.name] = r
    return out


def local_config(path: Path, quant: str | None) -> Config:
    """Every layer in this process: the reference."""
    ckpt = open_checkpoint(path)
    stage = load_stage(ckpt, ShardSpec.full(ckpt.config.num_hidden_layers), quant)
    ex = ShardExecutor(stage)

    async def stats():  # the executor's counters, in the shape of a node's
        return [SimpleNamespace(compute_ms=ex.compute_s * 1e3, network_ms=0.0, fed=0)]

    return Config("local", AsyncLocalPipeline(LocalPipeline([ex])), stats)


async def node_config(
    stack: contextlib.AsyncExitStack, path: Path, quant: str | None, n: int, threads: int, feed: int
) -> Config:
    """`n` node processes on 127.0.0.1 with an even split, kept up until `stack` closes (a cluster of its
    own per configuration: the nodes' counters then belong to it alone). `feed`: 0 no token feed, else the
    feed with results published in groups of `feed` (TokenFeed.results_every)."""
    num_layers = open_checkpoint(path).config.num_hidden_layers
    tag = f"feed{feed}-"
    cluster = stack.enter_context(
        LocalNodes(n, model_dir=path.parent, threads=threads, name=f"bench{n}-{tag}")
    )
    d = await deploy(cluster.addresses, path.name, num_layers, quant)
    stack.push_async_callback(d.close)
    pipe = RemotePipeline(d.clients, d.plan_id, feed=feed > 0, feed_results_every=max(1, feed))
    await pipe.start()
    stack.push_async_callback(pipe.aclose)

    async def stats():
        return [i.stats for i in await asyncio.gather(*(c.info() for c in d.clients))]

    # messages per token: coordinator -> node 1 -> ... -> node N -> coordinator, or N with the feed
    name = f"{n} nodes, feed/{feed}" if feed else f"{n} nodes, no feed"
    return Config(name, pipe, stats, hops=n if feed else n + 1)


def _table(rows: dict[str, dict], base: float):
    from rich.table import Table

    t = Table(
        "config",
        "ttft ms",
        "decode tok/s",
        "vs local",
        "step ms",
        "compute ms",
        "hop ms",
        "fed",
        title="pipeline: one sequence, greedy, same threads per stage",
    )
    for name, r in rows.items():
        t.add_row(
            name,
            f"{r['ttft_ms']:.1f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_tok_s'] / base:.2f}x",
            f"{r['step_ms']:.2f}",
            f"{r['compute_ms']:.2f}",
            f"{r['hop_ms']:.3f}",
            f"{r['fed']:.2f}",
        )
    return t


async def main_async(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from bigmodel import benchmark_model  # benchmarks/bigmodel.py, next to this script

    async with contextlib.AsyncExitStack() as stack:
        path = benchmark_model(args.model, stack)
        configs = [local_config(path, args.quant)]
        for n in args.nodes:
            for feed in args.feed:
                configs.append(await node_config(stack, path, args.quant, n, args.threads, feed))
        return await measure(configs, args.tokens, args.runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default=None, help="shard format (default: the checkpoint's own)")
    p.add_argument("--nodes", default="2,3", help="node counts to compare against local")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (and for local)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--feed",
        default="4,0",
        help="token feed settings to compare per node count: 0 = no feed, k = the last node feeds node 1 and "
        "publishes results in groups of k (default 4,0)",
    )
    p.add_argument("--quick", action="store_true", help="16 tokens, 1 run (smoke)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.nodes = [int(x) for x in args.nodes.split(",") if x]
    args.feed = [int(x) for x in args.feed.split(",") if x]
    if args.quick:
        args.tokens, args.runs = 16, 1
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows = asyncio.run(main_async(args))
    base = rows["local"]["decode_tok_s"]
    from rich.console import Console

    Console().print(_table(rows, base))
    report = {
        "model": args.model,
        "quant": args.quant or "default",
        "threads_per_stage": args.threads,
        "tokens": args.tokens,
        "runs": args.runs,
        "prompt_tokens": len(PROMPT),
        "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": {
            k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()}
            for k, v in rows.items()
        },
        "ratio_vs_local": {k: round(v["decode_tok_s"] / base, 3) for k, v in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
