"""`edgeshard run --peers ...`: split the model over the given nodes, load the shards, generate over the ring.

`deploy()` is the reusable part (also used by `cluster`, `demo` and the benchmark): connect to the nodes,
split the layers evenly in the given order, and load every shard at once with a progress bar per node. The
plan is a list of `{node, address, start_layer, end_layer, quant}` dicts, as `run --json` prints it.

Where later issues hook in: the planner replaces `even_split` (a `Plan` value instead of the dict list),
discovery replaces `--peers`, weight shipping extends `LoadShardRequest`, auth adds `metadata`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgeshard.node.config import ShardSpec, even_split
from edgeshard.node.security import Security
from edgeshard.node.wire import edgeshard_pb2 as pb

from .remote import RemotePipeline
from .stage_client import ClusterError, GrpcStageClient, connect, parse_peers


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
            }
            for c, info, s in zip(self.clients, self.infos, self.shards, strict=True)
        ]

    async def pipeline(self) -> RemotePipeline:
        """A started RemotePipeline over these nodes."""
        pipe = RemotePipeline(self.clients, self.plan_id)
        await pipe.start()
        return pipe

    async def close(self) -> None:
        """Close the channels (the nodes keep their shards)."""
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


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
) -> Deployment:
    """Connect to `addresses` (pipeline order), split `num_layers` evenly, and load the shards on all nodes.

    `model_ref` is what each node opens: a name relative to its --model-dir, or a registry name. `specs`
    (one per address, e.g. `Plan.specs()` of the planner) replaces the even split. `security`: the cluster
    key or INSECURE for the channels (None: this process's, see node/security.py).
    """
    if len(addresses) > num_layers:
        raise ClusterError(
            f"{len(addresses)} nodes but the model has only {num_layers} layers; use fewer nodes"
        )
    clients, infos = await connect(addresses, metadata, security)
    try:
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


def node_model_ref(model: str) -> str:
    """What a remote node is told to open for `--model`: a registry name as is, a path by its name.

    Nodes open files only under their own --model-dir, so a path given to the coordinator is sent as its last
    component; put the same file in each node's model directory (weight shipping is a later issue).
    """
    from edgeshard.node.models import REGISTRY

    return model if model in REGISTRY else Path(model).name


async def run_remote(args: argparse.Namespace) -> int:
    """`edgeshard run --peers ...`: deploy over the peers and stream one generation to stdout."""
    from edgeshard.node.checkpoint import open_checkpoint
    from edgeshard.node.models import resolve_model
    from edgeshard.node.tokenizer import Tokenizer

    from .cli import UserError, stream_generation

    planned = args.discover or getattr(args, "layers", None)  # the planner places the layers (placement.py)
    if not planned:
        try:
            peers = parse_peers(args.peers)
        except ValueError as e:
            raise UserError(str(e)) from None
    path = resolve_model(args.model)  # the coordinator needs the tokenizer (and the layer count) locally
    num_layers = open_checkpoint(path).config.num_hidden_layers
    tokenizer = Tokenizer.from_checkpoint(path)
    specs, extra, plan = None, {}, None
    if planned:
        from .placement import plan_for_args

        plan = await plan_for_args(args, path)
        peers, specs = plan.addresses(), plan.specs()
        extra = {"predicted_ms_per_token": plan.latency_ms, "predicted_tok_per_s": round(plan.tok_per_s, 2)}
    deployment = await deploy(peers, node_model_ref(args.model), num_layers, args.quant, specs=specs)
    try:
        from .recovery import resilient

        # a node that dies mid-generation costs a pause, not the run: the layers move to the nodes left
        # (--peers, or what mDNS finds then), and `recoveries` in --json says what happened
        candidates = parse_peers(args.peers) if args.peers else _discovered(args) if args.discover else peers
        pipeline = resilient(deployment, await deployment.pipeline(), path, plan=plan, candidates=candidates)
        try:
            return await stream_generation(
                args,
                pipeline,
                tokenizer,
                deployment.plan,
                extra={
                    "load_s": round(max(deployment.load_s), 3),
                    **extra,
                    "recoveries": pipeline.recoveries,  # filled in as they happen
                },
            )
        finally:
            await pipeline.aclose()
    finally:
        await deployment.close()


def _discovered(args: argparse.Namespace):
    """Candidates for a re-placement with --discover: the usable nodes mDNS finds at that moment."""

    async def candidates() -> list[str]:
        from .placement import gather_members

        return [m.address for m in await gather_members(args) if m.ok]

    return candidates
