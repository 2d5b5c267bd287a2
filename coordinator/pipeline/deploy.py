"""Deploying a plan: connect to the nodes, load every shard at once, hand back a `Deployment`.

`deploy()` is used by `run --peers/--discover`, `serve`, `cluster`, `demo`, recovery and the benchmarks: it
connects to the nodes, splits the layers (the planner's `Plan.specs()`, or evenly in the given order), and
loads every shard at once with a progress bar per node. `Deployment.plan` is a list of
`{node, address, start_layer, end_layer, quant}` dicts, as `run --json` prints it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgeshard.coordinator.errors import ClusterError
from edgeshard.coordinator.pipeline import holder
from edgeshard.coordinator.pipeline.remote import RemotePipeline
from edgeshard.coordinator.pipeline.stage_client import GrpcStageClient, connect
from edgeshard.node.model.config import ShardSpec, even_split
from edgeshard.node.security.channels import Security
from edgeshard.node.wire import edgeshard_pb2 as pb


@dataclass
class Deployment:
    """Nodes with their shards loaded for one plan, ready to open a `RemotePipeline` on."""

    clients: list[GrpcStageClient]
    infos: list[pb.NodeInfo]  # GetInfo before loading
    shards: list[pb.ShardInfo]  # what each node loaded
    plan_id: int
    load_s: list[float] = field(default_factory=list)  # seconds each node took to load

    @property
    def plan(self) -> list[dict]:
        """The plan as `run --json` reports it."""
        return [
            {
                "node": info.name,
                "address": c.address,
                "start_layer": s.start_layer,
                "end_layer": s.end_layer,
                "quant": s.quant,
                "weight_bytes": s.weight_bytes,
            }
            for c, info, s in zip(self.clients, self.infos, self.shards, strict=True)
        ]

    async def pipeline(self) -> RemotePipeline:
        """A started RemotePipeline over these nodes."""
        pipe = RemotePipeline(self.clients, self.plan_id)
        await pipe.start()
        return pipe

    async def close(self) -> None:
        """Let go of the nodes (they keep their shards, free for the next coordinator) and close the channels."""
        # only where our plan still runs: recovery closes the old deployment after loading the new one
        await asyncio.gather(*(c.release(self.plan_id) for c in self.clients), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


class NodeHeldError(ClusterError):
    """Nodes serve another coordinator's plan; the message names them, their holder, and --take-over."""

    default_code = "node_held"

    def __init__(self, held: Sequence[tuple[str, str, str]]) -> None:
        self.held = list(held)
        nodes = "; ".join(f"{name} ({address}) serves {who}" for address, name, who in held)
        super().__init__(
            f"{'a node is' if len(held) == 1 else 'nodes are'} busy with another coordinator's plan: {nodes}. "
            "Wait until it is done, use other nodes, or pass --take-over to take them (its requests fail over)"
        )


def new_plan_id() -> int:
    """A fresh plan epoch: milliseconds since the epoch, so a newer plan has a larger id."""
    return time.time_ns() // 1_000_000


async def deploy(
    addresses: Sequence[str],
    model_ref: str,
    num_layers: int,
    quant: str | None = None,
    console: Console | None = None,
    metadata: Sequence[tuple[str, str]] = (),
    specs: Sequence[ShardSpec] | None = None,
    security: Security | None = None,
    take_over: bool | None = None,
) -> Deployment:
    """Connect to `addresses` (pipeline order), split `num_layers` evenly, and load the shards on all nodes.

    `model_ref` is what each node opens: a name relative to its --model-dir, or a registry name. `specs`
    (one per address, e.g. `Plan.specs()` of the planner) replaces the even split. `security`: the cluster
    key or INSECURE for the channels (None: this process's, see node/security.py).

    Plan ownership (coordinator/pipeline/holder.py): this coordinator becomes the nodes' holder. A node
    another coordinator holds is refused before any node loads (NodeHeldError), unless `take_over` (None:
    what --take-over asked, once per process).
    """
    if len(addresses) > num_layers:
        raise ClusterError(
            f"{len(addresses)} nodes but the model has only {num_layers} layers; use fewer nodes"
        )
    if take_over is None:
        take_over = holder.take_over_now()
    clients, infos = await connect(addresses, (*metadata, *holder.metadata()), security)
    try:
        held = [
            (c.address, info.name, who)
            for c, info in zip(clients, infos)
            if (who := holder.held_elsewhere(info))
        ]
        if held and not take_over:  # nothing loaded yet: the other coordinator's requests keep running
            raise NodeHeldError(held)
        specs = list(specs) if specs is not None else even_split(num_layers, len(clients))
        if len(specs) != len(clients):
            raise ClusterError(f"{len(specs)} layer ranges for {len(clients)} nodes; give one per node")
        plan_id = new_plan_id()
        console = console or Console(stderr=True)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tensors"),
            TimeElapsedColumn(),
        )
        load_s = [0.0] * len(clients)
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:

            async def load(i: int) -> pb.ShardInfo:
                spec, c = specs[i], clients[i]
                task = bar.add_task(
                    f"{infos[i].name} ({c.address}) layers {spec.start_layer}-{spec.end_layer - 1}",
                    total=None,
                )
                req = pb.LoadShardRequest(
                    model=model_ref,
                    start_layer=spec.start_layer,
                    end_layer=spec.end_layer,
                    quant=quant or "",
                    plan_id=plan_id,
                    num_layers=num_layers,
                    next_hop=clients[i + 1].address if i + 1 < len(clients) else "last",
                    stages=len(clients),  # batching keeps one group of sequences per node in flight
                    coordinator=holder.this_coordinator(),
                    take_over=take_over,
                )
                t0 = time.perf_counter()

                def progress(p: pb.LoadProgress) -> None:
                    if p.tensors_total:
                        bar.update(task, total=p.tensors_total, completed=p.tensors_done)

                shard = await c.load(req, progress)
                load_s[i] = time.perf_counter() - t0
                return shard

            shards = await asyncio.gather(*(load(i) for i in range(len(clients))))
        return Deployment(clients, infos, list(shards), plan_id, load_s)
    except BaseException:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        raise
