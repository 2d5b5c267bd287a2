"""Throughput benchmark: aggregate tok/s of concurrent requests on 2 loopback nodes (continuous batching).

    python benchmarks/throughput.py                     # 1-16 concurrent requests, 64 tokens, int4 and bf16
    python benchmarks/throughput.py --quant default     # the checkpoint's own format (int4) only
    python benchmarks/throughput.py --compare-compute   # the nodes' compute thread against inline compute
    python benchmarks/throughput.py --quick             # CI smoke: 1 and 4 requests, 16 tokens, 1 run
    python benchmarks/throughput.py --layers even       # 15 + 15 layers instead of the planner's split
    python benchmarks/throughput.py --feed both         # with and without the direct token feed
    python benchmarks/throughput.py --model random-1.5b --quant default --levels 1,8   # a 1.59B Q4_0 model

Requests take the serving path, as `edgeshard serve --peers` runs them (serving.deployment_engine): Engine
(admission) -> generate() -> the ring driver (RemotePipeline) -> the nodes, each with one torch thread. Every
request has its own prompt and generates `--tokens` tokens (ignore_eos, greedy). Per concurrency level,
median over `--runs` (levels interleaved, so load from other work on the machine hits them alike):

* tok/s: generated tokens of all requests / wall time from the first submit to the last token;
* per node, from its GetInfo counters over the run: utilization = compute / wall (the stage's forward),
  idle share, and sequences per step (how many sequences one batched forward served); and from the OS, the
  node process's CPU time per generated token (batching shows there whatever else runs on the machine: on
  a loaded machine the wall-clock figures shrink with the cores the nodes get, the CPU per token does not).

Target: tok/s at 8 concurrent requests >= 4x tok/s at 1. Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.remote import RemotePipeline
from edgeshard.coordinator.placement.gather import PlacementOptions, plan_for
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.coordinator.serving.assemble import deployment_engine
from edgeshard.coordinator.serving.engine import GenerationRequest
from edgeshard.node.weights.checkpoint import open_checkpoint

RESULTS = Path(__file__).resolve().parent / "results" / "throughput.json"
TOPICS = [
    "the sea", "a lighthouse", "a robot", "the moon", "a forest", "a library", "a storm", "a cat",
    "a train", "a mountain", "a garden", "a clock", "a river", "a city", "a desert", "a violin",
]  # fmt: skip
FEEDS = {"on": [True], "off": [False], "both": [True, False]}  # --feed: RemotePipeline(feed=...) settings
TARGET_RATIO = 4.0  # tok/s at 8 concurrent requests over tok/s at 1
STAT_FIELDS = (
    "steps", "compute_ms", "network_ms", "wall_ms", "idle_ms", "queue_ms", "rows", "sequences", "messages",
    "frames",
)  # fmt: skip


class Ring:
    """A deployed 2-node ring and the serving engine over it."""

    def __init__(self, name: str, cluster: LocalNodes, deployment, served, chat: bool = True) -> None:
        self.name, self.cluster, self.deployment, self.served = name, cluster, deployment, served
        self.chat = chat  # chat messages, else a plain prompt (a random-weight model has no chat template)

    async def stats(self) -> list[dict]:
        """Each node's counters now, and its process's CPU seconds."""
        infos = await asyncio.gather(*(c.info() for c in self.deployment.clients))
        pids = dict(zip(self.cluster.addresses, (p.pid for p in self.cluster.procs), strict=True))
        # in pipeline order, as the counters: the planner may order the nodes differently from the cluster
        cpu = [sum(psutil.Process(pids[c.address]).cpu_times()[:2]) for c in self.deployment.clients]
        return [{**{f: getattr(i.stats, f) for f in STAT_FIELDS}, "cpu_s": c} for i, c in zip(infos, cpu)]

    async def run(self, n: int, tokens: int) -> dict:
        """`n` concurrent requests of `tokens` tokens: aggregate tok/s and the nodes' counters over the run."""
        engine = self.served.engine
        before = await self.stats()
        coordinator_cpu = time.process_time()  # this process: engine, ring driver, gRPC client
        t0 = time.perf_counter()
        gens = [
            engine.submit(
                GenerationRequest(
                    **_request(f"Write a story about {TOPICS[i % len(TOPICS)]}.", self.chat),
                    max_tokens=tokens,
                    temperature=0.0,
                    ignore_eos=True,
                )
            )
            for i in range(n)
        ]
        done = await asyncio.gather(*(g.collect() for g in gens))
        wall = time.perf_counter() - t0
        coordinator_cpu = time.process_time() - coordinator_cpu
        after = await self.stats()
        generated = sum(c.usage.completion_tokens for c in done)
        nodes = []
        for b, a in zip(before, after, strict=True):
            d = {f: a[f] - b[f] for f in (*STAT_FIELDS, "cpu_s")}
            nodes.append(
                {
                    "cpu_ms_per_token": d["cpu_s"] * 1e3 / max(1, generated),
                    "cpu_share": d["cpu_s"] / wall,  # of one core
                    "utilization": d["compute_ms"] / d["wall_ms"] if d["wall_ms"] else 0.0,
                    "idle": d["idle_ms"] / d["wall_ms"] if d["wall_ms"] else 0.0,
                    "sequences_per_step": d["sequences"] / max(1, d["steps"]),
                    "rows_per_step": d["rows"] / max(1, d["steps"]),
                    "compute_ms_per_step": d["compute_ms"] / max(1, d["steps"]),
                    "queue_ms_per_sequence": d["queue_ms"] / max(1, d["sequences"]),
                    "messages_per_frame": d["messages"] / max(1, d["frames"]),  # ForwardMessage.batch
                }
            )
        return {
            "tok_s": generated / wall,
            "wall_s": wall,
            "tokens": generated,
            "coordinator_cpu_ms_per_token": coordinator_cpu * 1e3 / max(1, generated),
            "nodes": nodes,
        }


def _request(text: str, chat: bool) -> dict:
    return {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}


async def open_rings(
    cluster: LocalNodes, path: Path, quant: str | None, mode: str, layers: str, feeds: list[bool]
) -> list[Ring]:
    """Load the model over the cluster's nodes and build the engine `serve` would, once per feed setting
    (`RemotePipeline(feed=...)`, over the same shards); named format/compute/split (", unfed" without the feed).

    layers "auto": the planner places the layers as `serve --peers ... --layers auto --objective throughput`
    does (the least loaded bottleneck stage, counting the head on the last node); "even": an even split;
    "19,11": those counts, in the cluster's order.
    """
    addresses, specs = cluster.addresses, None
    if layers != "even":
        opts = PlacementOptions(
            peers=",".join(cluster.addresses),
            layers=layers,
            objective="throughput",
            context=2048,
            sessions=16,
        )
        plan = await plan_for(opts, str(path), path, quant, show=False)
        addresses, specs = plan.addresses(), plan.specs()
    layers_total = open_checkpoint(path).config.num_hidden_layers
    deployment = await deploy(addresses, path.name, layers_total, quant, specs=specs)
    split = "+".join(str(s.end_layer - s.start_layer) for s in deployment.shards)
    rings = []
    for feed in feeds:
        pipeline = RemotePipeline(deployment.clients, deployment.plan_id, feed=feed)
        await pipeline.start()
        served = deployment_engine(deployment, pipeline, path, path.stem, max_running=64, max_queued=64)
        name = f"{deployment.shards[0].quant}/{mode}{'' if feed else ', unfed'}/{split}"
        rings.append(Ring(name, cluster, deployment, served, chat=not path.stem.startswith("random-")))
    return rings


async def measure(rings: list[Ring], levels: list[int], tokens: int, runs: int) -> dict[str, dict]:
    """Median over `runs` of every (ring, level), interleaved."""
    for ring in rings:  # warm-up: caches, kernels, streams
        await ring.run(max(levels), 4)
    samples: dict[tuple[str, int], list[dict]] = {}
    for _ in range(runs):
        for n in levels:
            for ring in rings:
                samples.setdefault((ring.name, n), []).append(await ring.run(n, tokens))
    out: dict[str, dict] = {}
    for (name, n), rs in samples.items():
        best = sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2]  # the median run, with its node counters
        out.setdefault(name, {})[str(n)] = {
            "tok_s": round(best["tok_s"], 2),
            "tok_s_runs": [round(r["tok_s"], 2) for r in rs],
            "wall_s": round(best["wall_s"], 3),
            "coordinator_cpu_ms_per_token": round(best["coordinator_cpu_ms_per_token"], 3),
            "nodes": [{k: round(v, 3) for k, v in node.items()} for node in best["nodes"]],
        }
    return out


def table(results: dict[str, dict], title: str) -> Table:
    """The results as a rich table: one row per (configuration, concurrency)."""
    t = Table(title=title)
    cols = (
        "format",
        "compute",
        "layers",
        "concurrent",
        "tok/s",
        "x vs 1",
        "CPU ms/tok",
        "util n1",
        "util n2",
        "seq/step",
    )
    for col in cols:
        t.add_column(col, justify="right")
    for name, levels in results.items():
        quant, mode, split = name.split("/")
        base = levels.get("1", {}).get("tok_s")
        for n, r in levels.items():
            nodes = r["nodes"]
            t.add_row(
                quant,
                mode,
                split,
                n,
                f"{r['tok_s']:.1f}",
                f"{r['tok_s'] / base:.2f}" if base else "-",
                f"{sum(node['cpu_ms_per_token'] for node in nodes):.1f}",
                *(f"{node['utilization']:.0%}" for node in nodes[:2]),
                " / ".join(f"{node['sequences_per_step']:.1f}" for node in nodes),
            )
    return t


async def main_async(args: argparse.Namespace) -> dict:
    """Start one 2-node cluster per (format, compute mode), measure them interleaved, stop them."""
    from bigmodel import benchmark_model  # benchmarks/bigmodel.py, next to this script

    modes = ["thread", "inline"] if args.compare_compute else [args.compute]
    clusters, rings = [], []
    stack = contextlib.ExitStack()
    path = benchmark_model(args.model, stack)
    try:
        for quant in args.quant:
            for mode in modes:
                cluster = LocalNodes(
                    2, model_dir=path.parent, threads=1, name=mode, node_args=["--compute", mode]
                )
                cluster.start()
                clusters.append(cluster)
                fmt = None if quant == "default" else quant
                rings += await open_rings(cluster, path, fmt, mode, args.layers, FEEDS[args.feed])
        return await measure(rings, args.levels, args.tokens, args.runs)
    finally:
        for ring in rings:
            await ring.served.close()
        for deployment in {id(r.deployment): r.deployment for r in rings}.values():
            await deployment.close()
        for cluster in clusters:
            cluster.stop()
        stack.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="a registry name or path, or random-SIZE: a random-weight Q4_0 model of benchmarks/bigmodel.py's "
        "sizes (1.5b: the users' case, a model no one board holds; prompts then go as plain text)",
    )
    p.add_argument("--levels", default="1,2,4,8,16", help="concurrent requests to measure, comma-separated")
    p.add_argument("--tokens", type=int, default=64, help="tokens each request generates")
    p.add_argument("--runs", type=int, default=3, help="runs per level (the median is reported)")
    p.add_argument(
        "--quant",
        default="default,bf16",
        help="shard formats, comma-separated: default (the checkpoint's own: int4) and/or f32, bf16, int8",
    )
    p.add_argument("--compute", default="thread", choices=("thread", "inline"), help="the nodes' --compute")
    p.add_argument(
        "--layers",
        default="auto",
        help="auto: the planner's split for throughput (default, as `serve --layers auto --objective "
        "throughput`); even: 15 + 15; or counts such as 19,11",
    )
    p.add_argument("--compare-compute", action="store_true", help="measure both --compute modes")
    p.add_argument(
        "--feed",
        default="on",
        choices=tuple(FEEDS),
        help="the direct token feed (the last node sends each token straight to the first): on (as `serve`), "
        "off, or both, measured interleaved on the same shards",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke: levels 1,4, 16 tokens, 1 run")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.levels, args.tokens, args.runs = "1,4", 16, 1
    args.levels = [int(x) for x in args.levels.split(",")]
    args.quant = args.quant.split(",")
    torch.set_num_threads(1)
    results = asyncio.run(main_async(args))
    console = Console(width=max(120, Console().width))  # the table, unwrapped, also in a log
    title = f"{args.model} on 2 loopback nodes, 1 thread each, {args.tokens} tokens/request"
    console.print(table(results, title))
    report = {
        "model": args.model,
        "nodes": 2,
        "threads_per_node": 1,
        "tokens_per_request": args.tokens,
        "layers": args.layers,
        "runs": args.runs,
        "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "load_average": os.getloadavg(),  # other work on the machine when the run ended
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": results,
        "targets": {},
    }
    for name, levels in results.items():
        if "1" in levels and "8" in levels:
            ratio = levels["8"]["tok_s"] / levels["1"]["tok_s"]
            met = ratio >= TARGET_RATIO
            report["targets"][name] = {"ratio_8_vs_1": round(ratio, 2), "at_least": TARGET_RATIO, "met": met}
            console.print(f"{name}: 8 vs 1 concurrent requests {ratio:.2f}x (target {TARGET_RATIO:.0f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
