"""Deploying a plan: connect to the nodes, load every shard at once, hand back a `Deployment`.

`deploy()` is used by `run --peers/--discover`, `serve`, `cluster`, `demo`, recovery and the benchmarks: it
connects to the nodes, splits the layers (the planner's `Plan.specs()`, or evenly in the given order), and
loads every shard at once with a progress bar per node. `Deployment.plan` is a list of
`{node, address, start_layer, end_layer, quant, weight_bytes, shipped_bytes, ship_s}` dicts, as `run --json`
prints it.

Weight shipping: given the model file the coordinator holds (`source`), a node that lacks the model gets the
tensors of its stage first (coordinator/pipeline/ship.py; a node holding the file or the tensors gets none)
and loads them from its slice cache. Tensors another node of the plan (or of `peers`) holds, the node pulls
from that node directly; the coordinator's file sends the rest. `deploy` remembers the source of a model reference, so a re-deploy by
failure recovery, which passes only the reference, ships to a spare too. A node whose --memory-limit is
below its stage's weights is refused before anything is shipped (CapacityError naming what is missing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from edgeshard.coordinator.errors import CapacityError, ClusterError
from edgeshard.coordinator.pipeline import holder
from edgeshard.coordinator.pipeline.remote import RemotePipeline
from edgeshard.coordinator.pipeline.ship import ShipReport, manifest_for, ship_stage
from edgeshard.coordinator.pipeline.stage_client import GrpcStageClient, connect
from edgeshard.node.model.config import ShardSpec, even_split
from edgeshard.node.presence.capability import format_bytes
from edgeshard.node.security.channels import Security
from edgeshard.node.weights.slice import Manifest
from edgeshard.node.wire import edgeshard_pb2 as pb


@dataclass
class Deployment:
    """Nodes with their shards loaded for one plan, ready to open a `RemotePipeline` on."""

    clients: list[GrpcStageClient]
    infos: list[pb.NodeInfo]  # GetInfo before loading
    shards: list[pb.ShardInfo]  # what each node loaded
    plan_id: int
    load_s: list[float] = field(default_factory=list)  # seconds each node took to load
    shipped: list[ShipReport | None] = field(default_factory=list)  # weight shipping per node (None: none)

    @property
    def plan(self) -> list[dict]:
        """The plan as `run --json` reports it."""
        shipped = self.shipped or [None] * len(self.clients)
        return [
            {
                "node": info.name,
                "address": c.address,
                "start_layer": s.start_layer,
                "end_layer": s.end_layer,
                "quant": s.quant,
                "weight_bytes": s.weight_bytes,
                "shipped_bytes": r.shipped_bytes if r else 0,
                "ship_s": round(r.seconds, 3) if r else 0.0,
                "from_peers_bytes": r.from_peers_bytes if r else 0,  # of shipped_bytes, pulled from nodes
            }
            for c, info, s, r in zip(self.clients, self.infos, self.shards, shipped, strict=True)
        ]

    async def pipeline(self) -> RemotePipeline:
        """A started RemotePipeline over these nodes."""
        pipe = RemotePipeline(self.clients, self.plan_id)
        await pipe.start()
        return pipe

    async def preload_spare(self, address: str, stage: int) -> pb.ShardInfo:
        """Make the node at `address` (outside the plan) a hot spare of `stage`: the stage's layers loaded there
        as this plan has them, under a plan id of its own, so a recovery that re-places that stage finds a
        node already holding them and loads nothing (coordinator/recovery/)."""
        shard, c = self.shards[stage], self.clients[stage]
        (client,), _ = await connect([address], security=c.security)
        try:
            req = pb.LoadShardRequest(
                model=shard.model,
                start_layer=shard.start_layer,
                end_layer=shard.end_layer,
                num_layers=shard.num_layers,
                quant=shard.quant,
                plan_id=new_plan_id(),
                next_hop=shard.next_hop,
                stages=len(self.shards),
            )
            return await client.load(req, lambda _progress: None)
        finally:
            await client.close()

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


# address -> live figures of the latest deploy to that node (shipping bytes, rate, ETA; loading tensors), for
# /v1/cluster while a deploy runs and after it (coordinator/serving/assemble.py)
_TRANSFERS: dict[str, dict] = {}


def transfers() -> dict[str, dict]:
    """What each node's latest deploy did or is doing: phase ("shipping", "loading", "ready", "failed"),
    bytes shipped of the total, bytes per second, ETA seconds, tensors loaded of the total."""
    return {a: dict(v) for a, v in _TRANSFERS.items()}


def _note(address: str, **figures) -> None:
    entry = _TRANSFERS.setdefault(address, {})
    entry.update(figures, updated_unix_s=round(time.time(), 3))


# model reference -> the file this process ships it from (set by deploy(source=...), used by recovery's
# deploy calls, which name only the reference)
_SOURCES: dict[str, Path] = {}


def _bytes_text(done: float, total: float | None, rate: float | None) -> str:
    text = f"{format_bytes(done)}/{format_bytes(total or 0)}"
    return f"{text} {format_bytes(rate)}/s" if rate else text


def check_memory(infos: Sequence[pb.NodeInfo], addresses: Sequence[str], specs, source: Path, quant) -> None:
    """CapacityError when a node's --memory-limit is below the weights of its stage (it would not fit)."""
    from edgeshard.node.model.cost import ModelCost
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.loader import checkpoint_quant

    limits = [i.capabilities.memory_limit for i in infos]
    if not any(limits):
        return
    ckpt = open_checkpoint(source)
    cost = ModelCost.of(ckpt.config, quant or checkpoint_quant(ckpt))
    for info, address, spec, limit in zip(infos, addresses, specs, limits, strict=True):
        need = cost.weight_bytes(spec.start_layer, spec.end_layer)
        if limit and need > limit:
            raise CapacityError(
                f"node {info.name} ({address}) has --memory-limit {format_bytes(limit)} but layers "
                f"{spec.start_layer}-{spec.end_layer - 1} need {format_bytes(need)} of {cost.quant} weights: "
                f"{format_bytes(need - limit)} missing (plus its KV cache); give it fewer layers "
                "(--layers auto places them by memory), raise its limit, or add a node"
            )


async def manifest_from_nodes(clients: Sequence[GrpcStageClient], model_ref: str) -> Manifest | None:
    """When the coordinator has no copy of `model_ref`: None if every node holds the model itself (nothing to
    ship) or none does (LoadShard says what is missing); else the manifest of the file a holder has
    (`SliceManifestOf`), so the nodes without it pull their tensors from the holders."""
    from edgeshard.node.weights.checkpoint import CheckpointError

    async def holds(c: GrpcStageClient) -> bool:
        try:
            status = await c.stub.SliceStatus(
                pb.SliceStatusRequest(model=model_ref, query_only=True), metadata=c.metadata, timeout=30
            )
            return status.has_model
        except grpc.aio.AioRpcError:  # an older node (UNIMPLEMENTED) or a refusal: not a source
            return False

    held = await asyncio.gather(*(holds(c) for c in clients))
    if all(held) or not any(held):
        return None
    source = next(c for c, h in zip(clients, held, strict=True) if h)
    try:
        reply = await source.stub.SliceManifestOf(
            pb.SliceManifestOfRequest(model=model_ref), metadata=source.metadata, timeout=600
        )
        return Manifest.from_pb(reply)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older node: no node-to-node shipping from it
            return None
        raise source._error(e, f"describing {model_ref!r}") from None
    except CheckpointError as e:
        raise ClusterError(f"node {source.address} described {model_ref!r} wrongly: {e}") from None


async def deploy(
    addresses: Sequence[str],
    model_ref: str,
    num_layers: int,
    quant: str | None = None,
    console: Console | None = None,
    metadata: Sequence[tuple[str, str]] = (),
    specs: Sequence[ShardSpec] | None = None,
    security: Security | None = None,
    source: Path | None = None,
    take_over: bool | None = None,
    peers: Sequence[str] = (),
) -> Deployment:
    """Connect to `addresses` (pipeline order), split `num_layers` evenly, and load the shards on all nodes.

    `model_ref` is what each node opens: a name relative to its --model-dir, or a registry name. `specs`
    (one per address, e.g. `Plan.specs()` of the planner) replaces the even split. `security`: the cluster
    key or INSECURE for the channels (None: this process's, see node/security/channels.py). `source`: the GGUF file
    this process holds for `model_ref`; nodes that lack the model get their stage's tensors shipped from it
    (None: the file given for `model_ref` before in this process, else nothing is shipped).

    Plan ownership (coordinator/pipeline/holder.py): this coordinator becomes the nodes' holder. A node
    another coordinator holds is refused before any node loads (NodeHeldError), unless `take_over` (None:
    what --take-over asked, once per process).

    `peers`: addresses of nodes outside the plan that may hold tensors a node lacks (e.g. the nodes of the
    previous plan); the plan's own nodes are asked too. A node pulls what a peer holds from that peer.
    """
    if source is not None:
        _SOURCES[model_ref] = Path(source)
    source = _SOURCES.get(model_ref)
    if source is not None and (source.is_dir() or not source.is_file()):
        source = None  # a Hugging Face directory is not shipped: the nodes need their own copy
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
        manifest = None
        if source is not None:
            await asyncio.to_thread(check_memory, infos, [c.address for c in clients], specs, source, quant)
            manifest = await manifest_for(source, model_ref)
        else:  # no file here: nodes that hold it can still serve the others (node-to-node shipping)
            manifest = await manifest_from_nodes(clients, model_ref)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
        )
        load_s = [0.0] * len(clients)
        shipped: list[ShipReport | None] = [None] * len(clients)
        members = {c.address for c in clients}
        extra = [
            GrpcStageClient(a, (*metadata, *holder.metadata()), security)
            for a in dict.fromkeys(peers)
            if a not in members
        ]
        sources = [*clients, *extra]  # who may hold tensors a node lacks (ship_stage skips the node itself)
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:

            async def load(i: int) -> pb.ShardInfo:
                spec, c = specs[i], clients[i]
                task = bar.add_task(
                    f"{infos[i].name} ({c.address}) layers {spec.start_layer}-{spec.end_layer - 1}",
                    total=None,
                    detail="",
                )
                slice_id = ""
                _TRANSFERS[c.address] = {"node": infos[i].name, "phase": "resolving"}
                if manifest is not None:
                    t_ship = time.perf_counter()

                    def shipping(done: int, total: int) -> None:
                        rate = done / max(1e-9, time.perf_counter() - t_ship)
                        detail = "shipping " + _bytes_text(done, total, rate)
                        bar.update(task, total=total, completed=done, detail=detail)
                        _note(
                            c.address,
                            phase="shipping",
                            bytes_done=done,
                            bytes_total=total,
                            bytes_per_s=round(rate),
                            eta_s=round((total - done) / rate, 1) if rate else None,
                        )

                    report = await ship_stage(c, model_ref, manifest, source, spec, shipping, sources)
                    _note(
                        c.address,
                        shipped_bytes=report.shipped_bytes,
                        ship_s=round(report.seconds, 3),
                        from_peers_bytes=report.from_peers_bytes,
                    )
                    if not report.has_model:
                        shipped[i], slice_id = report, manifest.id
                        bar.reset(task, total=None, detail="")
                req = pb.LoadShardRequest(
                    model=model_ref,
                    start_layer=spec.start_layer,
                    end_layer=spec.end_layer,
                    quant=quant or "",
                    plan_id=plan_id,
                    num_layers=num_layers,
                    next_hop=clients[i + 1].address if i + 1 < len(clients) else "last",
                    stages=len(clients),  # batching keeps one group of sequences per node in flight
                    slice_manifest=slice_id,
                    coordinator=holder.this_coordinator(),
                    take_over=take_over,
                )
                t0 = time.perf_counter()

                def progress(p: pb.LoadProgress) -> None:
                    _note(
                        c.address, phase="loading", tensors_done=p.tensors_done, tensors_total=p.tensors_total
                    )
                    if p.tensors_total:
                        bar.update(
                            task,
                            total=p.tensors_total,
                            completed=p.tensors_done,
                            detail=f"loading {p.tensors_done}/{p.tensors_total} tensors",
                        )

                try:
                    shard = await c.load(req, progress)
                except BaseException:
                    _note(c.address, phase="failed")
                    raise
                load_s[i] = time.perf_counter() - t0
                _note(c.address, phase="ready", load_s=round(load_s[i], 3))
                return shard

            try:
                shards = await asyncio.gather(*(load(i) for i in range(len(clients))))
            finally:
                await asyncio.gather(*(c.close() for c in extra), return_exceptions=True)
        return Deployment(clients, infos, list(shards), plan_id, load_s, shipped)
    except BaseException:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        raise
