"""Putting a server together: an `Engine` over a local or remote pipeline (run it with http_server.py).

    served = await local_engine("smollm2-135m")                            # every layer in this process
    served = await peers_engine(["192.0.2.2:50051", ...], "smollm2-135m")   # deploy over running nodes
    served = deployment_engine(deployment, pipeline, path, "smollm2-135m") # nodes someone already loaded
    served = await discovered_engine(args)                                 # mDNS + planner, 503 until a plan runs

Each returns a `Served`: the engine and what frees its pipeline. Nothing here touches HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeshard.coordinator.pipeline.local import ThreadedLocalPipeline
from edgeshard.coordinator.serving.admission import kv_capacity
from edgeshard.coordinator.serving.engine import Engine

if TYPE_CHECKING:
    from edgeshard.coordinator.placement.gather import PlacementOptions

INFO_TIMEOUT_S = 2.0  # GetInfo per node for /v1/cluster; a slow node shows as unreachable instead of hanging
RETRY_PLAN_S = 5.0  # serve --discover: seconds between planning attempts until a plan can run


@dataclass
class Served:
    """An engine and what frees its pipeline (streams, channels, worker threads)."""

    engine: Engine
    close: Callable[[], Awaitable[None]]
    plan: list[dict] | None = None


def model_names(ref: str, path: Path) -> tuple[str, list[str]]:
    """The name a server reports for `--model ref` (a registry name as is, else the file/dir stem) and aliases."""
    from edgeshard.node.weights.registry import REGISTRY

    name = ref if ref in REGISTRY else path.stem if path.is_file() else path.name
    return name, sorted({ref, path.name, path.stem, str(path)} - {name})


def _tokenizer_and_config(path: Path):
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.tokenizer import Tokenizer

    ckpt = open_checkpoint(path)
    # reuse the checkpoint's GGUF reader: opening one parses the whole vocabulary (as cli._run_local does)
    reader = getattr(ckpt, "reader", None)
    return (Tokenizer.from_gguf(reader) if reader is not None else Tokenizer.from_checkpoint(path)), ckpt


async def local_engine(
    model: str, quant: str | None = None, threads: int | None = None, **engine_kw: Any
) -> Served:
    """Load every layer of `model` in this process, computing in one worker thread."""
    import torch

    from edgeshard.node.model.config import ShardSpec
    from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
    from edgeshard.node.weights.loader import load_stage, stage_weight_bytes
    from edgeshard.node.weights.registry import resolve_model

    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(model)
    tokenizer, ckpt = _tokenizer_and_config(path)
    cfg = ckpt.config
    stage = await asyncio.to_thread(load_stage, ckpt, ShardSpec.full(cfg.num_hidden_layers), quant=quant)
    executor = ShardExecutor(stage, max_sessions=engine_kw.get("max_running", 8) + 1)
    pipeline = ThreadedLocalPipeline(LocalPipeline([executor]))
    plan = [
        {
            "node": "local",
            "address": None,
            "start_layer": 0,
            "end_layer": cfg.num_hidden_layers,
            "quant": stage.quant,
            "weight_bytes": stage_weight_bytes(stage),
        }
    ]

    async def info() -> dict:
        return {"mode": "local", "plan": plan, "nodes": pipeline.stage_stats()}

    async def close() -> None:
        await asyncio.to_thread(pipeline.shutdown)

    name, aliases = model_names(model, path)
    engine = Engine(
        pipeline, tokenizer, name, cfg.max_position_embeddings, aliases=aliases, info=info, **engine_kw
    )
    return Served(engine, close, plan)


def deployment_info(deployment, plan=None) -> Callable[[], Awaitable[dict]]:
    """What /v1/cluster reports for a deployment: the plan, each node's live counters, the planner's prediction."""

    async def info() -> dict:
        replies = await asyncio.gather(
            *(c.info(timeout=INFO_TIMEOUT_S) for c in deployment.clients), return_exceptions=True
        )
        out = {
            "mode": "cluster",
            "plan_id": deployment.plan_id,
            "plan": deployment.plan,
            "nodes": [node_status(e, r) for e, r in zip(deployment.plan, replies, strict=True)],
        }
        if plan is not None:
            out["prediction"] = plan.to_dict()
        out["transfers"] = _transfers()  # weight shipping and loading per node (live while a deploy runs)
        return out

    return info


def _transfers() -> dict:
    from edgeshard.coordinator.pipeline.deploy import transfers

    return transfers()


async def _transfer_info() -> dict:
    """/v1/cluster before a plan runs (serve --discover): what the deploys in progress are doing."""
    return {"mode": "cluster", "transfers": _transfers()}


def node_status(entry: dict, reply: Any) -> dict:
    """One node of /v1/cluster: its plan entry plus its live counters (or why it did not answer)."""
    if isinstance(reply, BaseException):
        return {**entry, "status": "unreachable", "error": str(reply)}
    s = reply.stats
    steps = max(1, s.steps)
    return {
        **entry,
        "status": "ok",
        "steps": s.steps,
        "compute_ms_per_step": round(s.compute_ms / steps, 3),
        "network_ms_per_step": round(s.network_ms / steps, 3),
        # continuous batching: how full the batches are and how busy the stage is (since its shard loaded)
        "rows_per_step": round(s.rows / steps, 2),
        "sequences_per_step": round(s.sequences / steps, 2),
        "batch_hist": list(s.batch_hist),  # steps of 1, 2, 3-4, 5-8, ... 65+ sequences
        # messages one gRPC message brought in (a group's steps travel as one: ForwardMessage.batch)
        "messages_per_frame": round(s.messages / s.frames, 2) if s.frames else 0.0,
        "utilization": round(s.compute_ms / s.wall_ms, 3) if s.wall_ms else 0.0,
        "idle_ms": round(s.idle_ms, 1),
        "queue_ms_per_step": round(s.queue_ms / max(1, s.sequences), 3),
        "sessions": s.sessions,
        "kv_bytes": s.kv_bytes,
        "kv_reserved": s.kv_reserved,
        "kv_budget": reply.shard.kv_budget if reply.loaded else 0,
        "errors": s.errors,
        # totals since the shard loaded: the dashboard and /metrics take differences of them (recent rates)
        "compute_ms": round(s.compute_ms, 3),
        "network_ms": round(s.network_ms, 3),
        "wall_ms": round(s.wall_ms, 1),
        "rows": s.rows,
        # what the node is (the dashboard draws it)
        "name": reply.name,
        "version": reply.version,
        **machine(reply.capabilities),
    }


def machine(c: Any) -> dict:
    """A node's Capabilities as /v1/cluster shows them (arch, cores, memory, threads, formats)."""
    return {
        "arch": c.arch,
        "cores": c.cores,
        "torch_threads": c.torch_threads,
        "memory_total": c.memory_total,
        "memory_free": c.memory_free,
        "memory_limit": c.memory_limit,
        "quant_formats": list(c.quant_formats),
        "platform": c.platform,
        "kernels": c.kernels,
    }


def _remote_engine(
    path: Path, model: str, pipeline, info, reason: str, context: int | None = None, **engine_kw: Any
) -> Engine:
    tokenizer, ckpt = _tokenizer_and_config(path)
    name, aliases = model_names(model, path)
    # a planned cluster budgeted KV memory for `context` positions per sequence: serve no longer ones
    ctx = min(ckpt.config.max_position_embeddings, context or ckpt.config.max_position_embeddings)
    return Engine(
        pipeline, tokenizer, name, ctx, aliases=aliases, info=info, unavailable_reason=reason, **engine_kw
    )


_BROKEN = "no plan can run now"


def resilient_info(pipe) -> Callable[[], Awaitable[dict]]:
    """/v1/cluster of a `recovery.ResilientPipeline`: its current deployment, plus liveness and recoveries."""

    async def info() -> dict:
        out = await deployment_info(pipe.deployment, pipe.plan)()
        out["recovery"] = await pipe.status()
        return out

    return info


def deployment_engine(
    deployment, pipeline, path: Path, model: str, plan=None, candidates=None, **engine_kw: Any
) -> Served:
    """An engine over a started RemotePipeline on a `pipeline.deploy.Deployment` (nodes with shards loaded).

    The engine survives nodes dying (coordinator/recovery/resilient.py): it re-places the layers over `candidates`
    (addresses, or a coroutine function returning them; default: the deployment's nodes). `close` closes
    the pipeline's streams and what recoveries deployed, not the deployment (whoever deployed it closes it).
    """
    from edgeshard.coordinator.recovery.resilient import resilient

    pipe = resilient(deployment, pipeline, path, plan=plan, candidates=candidates)
    context = plan.context if plan is not None else None
    engine_kw.setdefault("kv_capacity", kv_capacity(deployment.shards))  # admission fits the nodes' budgets
    engine = _remote_engine(path, model, pipe, resilient_info(pipe), _BROKEN, context, **engine_kw)
    follow_kv_capacity(pipe, engine)
    return Served(engine, pipe.aclose, deployment.plan)


def follow_kv_capacity(pipe, engine: Engine) -> None:
    """After a recovery the nodes' KV budgets are those of the new plan: admit by them from then on."""
    pipe.on_new_plan.append(lambda d: setattr(engine.admission, "kv_capacity", kv_capacity(d.shards)))


async def _deploy(peers: Sequence[str], model: str, path: Path, quant, console, node_model, specs):
    """Load the shards over `peers` and open the ring: (deployment, started RemotePipeline)."""
    from edgeshard.coordinator.discovery.members import refuse_revoked
    from edgeshard.coordinator.pipeline.deploy import deploy
    from edgeshard.coordinator.placement.gather import node_model_ref
    from edgeshard.node.weights.checkpoint import open_checkpoint

    num_layers = open_checkpoint(path).config.num_hidden_layers
    ref = node_model or node_model_ref(model)
    await refuse_revoked(peers)  # a node `secret revoke` removed is never deployed to (#20)
    deployment = await deploy(peers, ref, num_layers, quant, console=console, specs=specs, source=path)
    try:
        return deployment, await deployment.pipeline()
    except BaseException:
        await deployment.close()
        raise


async def peers_engine(
    peers: Sequence[str],
    model: str,
    quant: str | None = None,
    console=None,
    node_model: str | None = None,
    plan=None,
    candidates: Sequence[str] | None = None,
    **engine_kw: Any,
) -> Served:
    """Deploy `model` over running nodes at `peers` (pipeline order; split evenly, or as the planner's `plan`
    says) and serve it. `node_model` is what the nodes open (default: `placement.gather.node_model_ref`). After a
    node failure the layers are re-placed over `candidates` (default: `peers`; give every --peers address,
    also the ones the plan left out, as spares). `close` frees the streams and channels; the nodes keep their
    shards."""
    from edgeshard.node.weights.registry import resolve_model

    path = resolve_model(model)  # the coordinator reads the tokenizer and layer count locally
    specs = plan.specs() if plan is not None else None
    deployment, pipeline = await _deploy(peers, model, path, quant, console, node_model, specs)
    served = deployment_engine(
        deployment, pipeline, path, model, plan, candidates=candidates or peers, **engine_kw
    )
    close_pipeline = served.close

    async def close() -> None:
        await close_pipeline()
        await deployment.close()

    served.close = close
    return served


async def discovered_engine(
    model: str,
    quant: str | None,
    opts: PlacementOptions,
    console=None,
    retry_s: float = RETRY_PLAN_S,
    **engine_kw: Any,
) -> Served:
    """`serve --discover`: find nodes with mDNS, plan, deploy, serve. Until a plan can run (no nodes yet, too
    little memory) the engine answers 503 with the planner's reason and planning is retried every `retry_s`.

    `opts` are the placement flags (where mDNS runs, the cluster name, what to budget).
    """
    from edgeshard.coordinator.discovery.mdns import ZeroconfDiscovery
    from edgeshard.coordinator.errors import ClusterError, PlanError
    from edgeshard.coordinator.placement.gather import plan_for
    from edgeshard.coordinator.recovery.resilient import resilient
    from edgeshard.node.security.channels import current
    from edgeshard.node.weights.registry import resolve_model

    current()  # no cluster key: ClusterKeyError now, not silently inside the background planning task
    path = resolve_model(model)
    reason = "no plan can run yet: looking for nodes"
    engine = _remote_engine(path, model, None, _transfer_info, reason, opts.context, **engine_kw)
    held: list = []  # deployment, pipeline once attached
    # after a failure, the layers are re-placed over the nodes mDNS knows then (joined ones included)
    discovery = ZeroconfDiscovery(list(opts.mdns_interfaces), opts.cluster)

    async def candidates() -> list[str]:
        found = [m.address for m in discovery.members() if m.ok]  # browsing since start: warm
        return found or [m.address for m in await discovery.browse(opts.timeout) if m.ok]

    async def plan_until_ready() -> None:
        await discovery.start()
        while True:
            try:
                plan = await plan_for(opts, model, path, quant)
                deployment, pipeline = await _deploy(
                    plan.addresses(), model, path, quant, console, None, plan.specs()
                )
            except (PlanError, ClusterError) as e:
                engine.unavailable_reason = f"no plan can run yet ({e}); retrying every {retry_s:g} s"
                if console is not None:
                    console.print(f"[yellow]{engine.unavailable_reason}[/]", soft_wrap=True)
                await asyncio.sleep(retry_s)
                continue
            pipe = resilient(deployment, pipeline, path, plan=plan, candidates=candidates)
            held[:] = [deployment, pipe]
            engine.unavailable_reason = _BROKEN
            engine.attach(pipe, resilient_info(pipe), kv_capacity(deployment.shards))
            follow_kv_capacity(pipe, engine)
            return

    task = asyncio.create_task(plan_until_ready())

    async def close() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if held:
            await held[1].aclose()
            await held[0].close()
        await discovery.close()

    return Served(engine, close)
