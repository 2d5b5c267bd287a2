"""LoadShard: resolve the model reference inside the model directory, load the layer range, report progress.

Loading reads and converts tensors for seconds, so it runs in a worker thread; progress comes back to the
event loop through a queue and is streamed to the coordinator. The node keeps answering GetInfo and Health
meanwhile, and refuses Forward messages with FAILED_PRECONDITION until the shard is installed.

Asked for the shard it already holds (same model, layers and format) under a new plan id, as failure
recovery does for the nodes that survive, a node keeps its weights and installs them afresh: new plan id,
new next hop; its sessions are carried over for a recovery to resume (node/service/recover.py; those
nobody resumes end after ring.ORPHAN_S). The new epoch fences off the old plan's messages as a reload would.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from edgeshard.node.lowbit.formats import QUANT_FORMATS
from edgeshard.node.model.config import ShardSpec, UnsupportedModelError
from edgeshard.node.model.executor import ShardExecutor
from edgeshard.node.service.ring import LAST, LoadedShard, RingNode
from edgeshard.node.weights.cache import SliceCache
from edgeshard.node.weights.checkpoint import CheckpointError, open_checkpoint
from edgeshard.node.weights.loader import checkpoint_quant, load_stage, stage_tensor_count, stage_weight_bytes
from edgeshard.node.weights.model_dir import resolve_in_model_dir
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import WireError, invalid

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


_LIBC: Any = None


def release_free_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Converting a tensor allocates temporaries (dequantized rows, repacked codes) in the loader thread's malloc
    arena; glibc keeps what they free for reuse, so without this a node's resident memory after loading is
    about twice its weights (measured: benchmarks/bigmodel.py). Trimming after each tensor keeps it at the
    weights plus the largest single tensor's temporaries.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def check_request(req: pb.LoadShardRequest) -> None:
    """Refuse a LoadShard request that cannot be right, before touching any file."""
    if req.quant and req.quant not in QUANT_FORMATS:
        raise invalid(f"unknown quant {req.quant!r}; choose one of {', '.join(QUANT_FORMATS)} (or empty)")
    if req.end_layer <= req.start_layer:
        raise invalid(f"layer range [{req.start_layer}, {req.end_layer}) is empty")
    if req.next_hop != LAST:
        m = _HOST_PORT.match(req.next_hop)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise invalid(f"next_hop {req.next_hop!r} is not host:port or {LAST!r}")


async def load_shard(
    node: RingNode,
    req: pb.LoadShardRequest,
    model_dir: Path,
    max_len: int | None = None,
    slices: SliceCache | None = None,
) -> AsyncIterator[pb.LoadProgress]:
    """Load the shard `req` names and install it on `node`, yielding progress; raises WireError.

    With `req.slice_manifest` the tensors come from the slice cache `slices` (shipped by the coordinator,
    node/service/slices.py) instead of a file in `model_dir`."""
    check_request(req)
    yield pb.LoadProgress(stage="resolving")
    t0 = time.perf_counter()
    held = node.shard
    if held is not None and await _holds(held, req, model_dir, slices):
        shard = LoadedShard(
            executor=ShardExecutor(
                held.executor.stage,
                max_sessions=node.max_sessions,
                max_len=max_len,
                kv_budget=node.kv_budget_for(held.weight_bytes),
            ),
            model=req.model,
            quant=held.quant,
            plan_id=req.plan_id,
            next_hop=req.next_hop,
            weight_bytes=held.weight_bytes,
            load_s=time.perf_counter() - t0,
            stages=req.stages,
        )
        shard.executor.adopt(
            held.executor
        )  # recovery: its sessions wait to be resumed (node/service/recover.py)
        await node.install(shard)  # ends the old plan's stream, as a reload would
        total = 1
        yield pb.LoadProgress(
            stage="ready", tensors_done=total, tensors_total=total, done=True, shard=shard.info()
        )
        return
    await node.unload()  # old sessions belong to the old plan; free their memory before loading
    node.loading = True
    try:
        try:
            ckpt = await asyncio.to_thread(_open, req, model_dir, slices)
        except (CheckpointError, UnsupportedModelError) as e:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot load {req.model!r}: {e}") from e
        n = ckpt.config.num_hidden_layers
        if req.num_layers and req.num_layers != n:
            raise invalid(f"the plan expects {req.num_layers} layers but {req.model!r} has {n} on this node")
        try:
            spec = ShardSpec(req.start_layer, req.end_layer, n)
        except ValueError as e:
            raise invalid(str(e)) from None
        if spec.is_last != (req.next_hop == LAST):
            raise invalid(
                f"layers {spec.start_layer}-{spec.end_layer - 1} of {n}: next_hop must be "
                f"{LAST!r} exactly when the shard ends at the last layer"
            )
        total = stage_tensor_count(ckpt.config, spec)  # exact for every family (fused, experts, norms)
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue = asyncio.Queue()
        done = [0, 0]

        def on_tensor(name: str, nbytes: int) -> None:  # in the loader thread
            release_free_memory()  # the tensor's conversion temporaries go back to the OS, not to the heap
            done[0] += 1
            done[1] += nbytes
            loop.call_soon_threadsafe(progress.put_nowait, (done[0], done[1]))

        task = asyncio.ensure_future(asyncio.to_thread(load_stage, ckpt, spec, req.quant or None, on_tensor))
        while not task.done():
            getter = asyncio.ensure_future(progress.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                k, b = getter.result()
                yield pb.LoadProgress(stage="loading", tensors_done=k, tensors_total=total, bytes_done=b)
            else:
                getter.cancel()
        try:
            stage = task.result()
        except (CheckpointError, ValueError) as e:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot load {req.model!r}: {e}") from e
        except MemoryError as e:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"not enough memory for {spec} of {req.model!r}; give this node fewer layers",
            ) from e
        weight_bytes = stage_weight_bytes(stage)
        shard = LoadedShard(
            executor=ShardExecutor(
                stage,
                max_sessions=node.max_sessions,
                max_len=max_len,
                kv_budget=node.kv_budget_for(weight_bytes),
            ),
            model=req.model,
            quant=stage.quant,
            plan_id=req.plan_id,
            next_hop=req.next_hop,
            weight_bytes=weight_bytes,
            load_s=time.perf_counter() - t0,
            stages=req.stages,
        )
        await node.install(shard)
        if slices is not None:  # the loaded shard's tensors stay in the cache whatever --cache-limit says
            slices.pin("loaded", _slice_hashes(ckpt, spec))
            slices.unpin("incoming")
            slices.loaded = req.slice_manifest
    finally:
        node.loading = False
    yield pb.LoadProgress(
        stage="ready",
        tensors_done=total,
        tensors_total=total,
        bytes_done=shard.weight_bytes,
        done=True,
        shard=shard.info(),
    )


def _open(req: pb.LoadShardRequest, model_dir: Path, slices: SliceCache | None):
    """The checkpoint `req` names: the slice of its manifest in the cache, or the file in the model dir."""
    if req.slice_manifest:
        manifest = slices.manifest(req.slice_manifest) if slices is not None else None
        if manifest is None:
            raise WireError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"slice manifest {req.slice_manifest[:12]!r} is unknown to this node; the coordinator sends it "
                "(SliceStatus) before loading",
            )
        return slices.open_slice(manifest)
    return open_checkpoint(resolve_in_model_dir(req.model, model_dir))


def _slice_hashes(ckpt, spec: ShardSpec) -> list[str]:
    manifest = getattr(ckpt, "manifest", None)
    return [] if manifest is None else [t.sha256 for t in manifest.stage_tensors(spec)]


async def _holds(
    held: LoadedShard, req: pb.LoadShardRequest, model_dir: Path, slices: SliceCache | None = None
) -> bool:
    """`held` is the shard `req` asks for: same model reference, layer range and format (and last-ness)."""
    spec = held.spec
    if (req.model, req.start_layer, req.end_layer) != (held.model, spec.start_layer, spec.end_layer):
        return False
    if slices is not None and req.slice_manifest and req.slice_manifest != slices.loaded:
        return False  # same name, other bytes (the coordinator's file changed): load the new slice
    if (req.num_layers and req.num_layers != spec.num_layers) or spec.is_last != (req.next_hop == LAST):
        return False
    if req.quant:
        return req.quant == held.quant
    try:  # "" is the checkpoint's own format: look it up (the header only, a fraction of a second)
        return checkpoint_quant(await asyncio.to_thread(_open, req, model_dir, slices)) == held.quant
    except (WireError, CheckpointError, UnsupportedModelError, OSError):
        return False  # the normal path reports what is wrong
