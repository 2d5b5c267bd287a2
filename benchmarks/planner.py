"""Planner benchmark: predicted vs measured decode speed on an unequal loopback cluster, and vs the even split.

Three node processes on 127.0.0.1, made unequal the way real boards are: thread counts (2, 1, 1) and memory
limits (200, 64, 60 MiB: only the first holds the whole demo model). Nodes are started one after the other,
so their start-up microbenchmarks do not compete for the cores, and re-measure themselves every few seconds
while idle (the planner sees the median of their last 5 runs: on a shared machine one second's load is not a
node's speed). Then:

  1. the planner's plan (objective latency) and the even split over all three nodes, both predicted by the
     same cost model from the same inputs (coordinator/placement/planner.py);
  2. both deployed and run in turns (auto, even, auto, even, ...: load from other work on the machine hits
     both alike), each run a greedy generation of `--tokens` tokens after a fixed prompt;
  3. reported per plan (median over runs): predicted and measured decode tok/s and their ratio, and per stage
     the predicted and measured compute ms per token (measured: the node's own counters).

Targets: the prediction within 20% of the measurement, and the planner's plan faster than the even split.

    python benchmarks/planner.py                 # 64 tokens, 3 runs per plan
    python benchmarks/planner.py --quick         # CI smoke: 16 tokens, 1 run

Writes benchmarks/results/planner.json. mDNS is not involved (nodes are given as --peers); the discovery path
is covered by tests/test_discovery.py and tests/test_netns.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.registry import resolve_model

RESULTS = Path(__file__).resolve().parent / "results" / "planner.json"
# (name, threads, memory limit): only "big" can hold the whole model (about 137 MiB with the KV cache)
NODES = [("big", 2, "200M"), ("mid", 1, "64M"), ("small", 1, "60M")]
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
    3511,
    30,
    2,
    198,
    1,
    4093,
    198,
    23790,
    260,
    1789,
    282,
    253,
    2951,
    1001,
    30,
    2,
    198,
    1,
    520,
    9531,
]  # a SmolLM2 chat turn, 30 tokens
CONTEXT = 512
REMEASURE_S = 3.0  # nodes re-measure themselves this often while idle; the planner sees the median of 5 runs


class UnequalNode(LocalNodes):
    """One node process with its own thread count and memory limit."""

    def __init__(self, name: str, threads: int, limit: str, model_dir: Path) -> None:
        super().__init__(1, model_dir=model_dir, threads=threads, name=name)
        self.limit = limit

    def command(self, i: int) -> list[str]:
        return super().command(i) + ["--memory-limit", self.limit, "--benchmark-every", str(REMEASURE_S)]


async def _stats(deployment) -> list:
    return [i.stats for i in await asyncio.gather(*(c.info() for c in deployment.clients))]


async def _run_once(plan, model_ref: str, tokens: int) -> dict:
    """Deploy `plan`, generate once, and return decode tok/s and per-stage compute ms per step."""
    deployment = await deploy(
        plan.addresses(), model_ref, plan.num_layers, None, console=Console(quiet=True), specs=plan.specs()
    )
    try:
        pipeline = await deployment.pipeline()
        try:
            warm = Sequence(PROMPT[:8], SamplingParams(temperature=0.0), 4)
            async for _ in generate(pipeline, warm):
                pass
            seq = Sequence(PROMPT, SamplingParams(temperature=0.0), tokens, frozenset())
            before = None
            async for _ in generate(pipeline, seq):
                if before is None:  # the prompt is in: count decode steps only from here
                    before = await _stats(deployment)
            after = await _stats(deployment)
        finally:
            await pipeline.aclose()
    finally:
        await deployment.close()
    compute = [
        (a.compute_ms - b.compute_ms) / max(1, a.steps - b.steps) for a, b in zip(after, before, strict=True)
    ]
    return {"decode_tok_s": seq.decode_tok_per_s, "stage_compute_ms": compute, "tokens": len(seq.generated)}


def _summary(plan, runs: list[dict]) -> dict:
    measured = statistics.median(r["decode_tok_s"] for r in runs)
    return {
        "stages": [
            {
                "node": s.node,
                "layers": [s.start_layer, s.end_layer],
                "predicted_compute_ms": s.compute_ms,
                "measured_compute_ms": round(statistics.median(r["stage_compute_ms"][i] for r in runs), 3),
            }
            for i, s in enumerate(plan.stages)
        ],
        "predicted_tok_s": round(plan.tok_per_s, 2),
        "measured_tok_s": round(measured, 2),
        "measured_over_predicted": round(measured / plan.tok_per_s, 3),
        "runs": [round(r["decode_tok_s"], 2) for r in runs],
    }


async def bench(args: argparse.Namespace, model: str, addresses: list[str]) -> dict:
    """Plan, run both plans in turns, and summarise."""
    from edgeshard.coordinator.discovery.mdns import StaticDiscovery
    from edgeshard.coordinator.placement.gather import plan_node, usable
    from edgeshard.coordinator.placement.links import measure_links
    from edgeshard.coordinator.placement.planner import make_plan
    from edgeshard.node.model.config import even_split
    from edgeshard.node.model.cost import ModelCost
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.loader import checkpoint_quant

    ckpt = open_checkpoint(resolve_model(model))
    cost = ModelCost.of(ckpt.config, checkpoint_quant(ckpt))
    members = usable(await StaticDiscovery(addresses).browse())
    links = await measure_links(addresses)
    nodes = [plan_node(m, links[m.address]) for m in members]  # one snapshot: both plans see the same inputs
    even = [s.end_layer - s.start_layer for s in even_split(cost.num_layers, len(nodes))]
    plans = {
        name: make_plan(nodes, cost, model=model, context=CONTEXT, layers=layers)
        for name, layers in (("planner", None), ("even split", even))
    }
    runs: dict[str, list[dict]] = {name: [] for name in plans}
    for _ in range(args.runs):
        for name, plan in plans.items():
            runs[name].append(await _run_once(plan, plan.model, args.tokens))
    out = {name: {"plan": plan.to_dict(), **_summary(plan, runs[name])} for name, plan in plans.items()}
    out["capabilities"] = {m.name: m.capability.to_dict() for m in members}
    out["links_rtt_ms"] = {m.name: links[m.address].rtt_ms for m in members}
    return out


def main() -> None:
    """Start the nodes, run the benchmark, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.runs = 16, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = "smollm2-135m"
    model_dir = resolve_model(model).parent
    nodes = []
    try:
        for name, threads, limit in NODES:  # one at a time: each node's benchmark gets the machine to itself
            nodes.append(UnequalNode(name, threads, limit, model_dir))
            nodes[-1].start()
        time.sleep(6 * REMEASURE_S)  # let every node collect its 5 runs: one second's load is not the speed
        results = asyncio.run(bench(args, model, [n.addresses[0] for n in nodes]))
    finally:
        for n in nodes:
            n.stop()
    capabilities, rtts = results.pop("capabilities"), results.pop("links_rtt_ms")
    auto, even = results["planner"], results["even split"]
    table = Table(
        "plan",
        "stages (node: layers, predicted / measured compute ms)",
        "predicted tok/s",
        "measured tok/s",
        "measured / predicted",
        title=f"planner benchmark ({args.tokens} tokens, median of {args.runs} runs, context {CONTEXT})",
    )
    for name, r in results.items():
        stages = "\n".join(
            f"{s['node']}: {s['layers'][0]}-{s['layers'][1] - 1}, {s['predicted_compute_ms']:.1f} / "
            f"{s['measured_compute_ms']:.1f}"
            for s in r["stages"]
        )
        table.add_row(
            name,
            stages,
            f"{r['predicted_tok_s']:.1f}",
            f"{r['measured_tok_s']:.1f}",
            f"{r['measured_over_predicted']:.2f}",
        )
    console = Console()
    console.print(table)
    speedup = auto["measured_tok_s"] / even["measured_tok_s"]
    within = abs(auto["measured_over_predicted"] - 1) <= 0.2
    console.print(
        f"planner vs even split: {speedup:.2f}x measured ({'beats' if speedup > 1 else 'does NOT beat'} "
        f"it); prediction {'within' if within else 'NOT within'} 20% of the measurement"
    )
    out = {
        "model": model,
        "context": CONTEXT,
        "tokens": args.tokens,
        "runs": args.runs,
        "nodes": [{"name": n, "threads": t, "memory_limit": m} for n, t, m in NODES],
        "machine": {"arch": platform.machine(), "cores": os.cpu_count()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "capabilities": capabilities,
        "links_rtt_ms": rtts,
        "results": results,
        "planner_over_even_measured": round(speedup, 3),
        "prediction_within_20pct": within,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
