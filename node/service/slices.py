"""SliceStatus, ShipSlice, ReadSlice and PullSlice: a node receives the tensors of its stage (weight shipping).

The coordinator asks first (`slice_status`): the node records the manifest, says whether it holds the model
file itself (then nothing ships), which of the wanted tensors its cache already holds, verified, and which it
holds in part. Then the rest comes, either streamed by the coordinator from its file (`ship_slice`) or
fetched by this node from another node that holds them (`pull_slice`, which reads the other node's
`read_slice` stream into the same receiving code). Each tensor is written to a partial file as its chunks
arrive and admitted when the last one has come and the bytes hash to the manifest's SHA-256. A mismatch is
reported back and sent again from its first byte; a stream that breaks inside a tensor keeps what arrived,
and the next stream resumes that tensor at the byte where it stopped (its hash is still checked over all of
its bytes: the prefix is hashed again from disk).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from edgeshard.node.weights.cache import CacheFullError, HashMismatchError, SliceCache
from edgeshard.node.weights.checkpoint import CheckpointError
from edgeshard.node.weights.model_dir import resolve_in_model_dir
from edgeshard.node.weights.slice import Manifest
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import WireError, invalid

log = logging.getLogger("edgeshard.node")

MAX_MANIFEST_TENSORS = 100_000  # a model has hundreds to a few thousand; refuse an absurd manifest
MAX_WANT = 100_000
INCOMING = "incoming"  # pin owner of the tensors a coming load needs


async def slice_status(cache: SliceCache, req: pb.SliceStatusRequest, model_dir: Path) -> pb.SliceStatusReply:
    """Record the manifest; say whether the model file is here and which wanted tensors are cached."""
    has_model = False
    if req.model:
        try:
            await asyncio.to_thread(resolve_in_model_dir, req.model, model_dir, False)
            has_model = True
        except WireError:
            has_model = False
    if len(req.manifest.tensors) > MAX_MANIFEST_TENSORS or len(req.want) > MAX_WANT:
        raise invalid("the slice manifest names too many tensors")
    if req.manifest.id:
        try:
            manifest = Manifest.from_pb(req.manifest)
        except (CheckpointError, ValueError, TypeError) as e:
            raise invalid(f"bad slice manifest: {e}") from None
        await asyncio.to_thread(cache.save_manifest, manifest)
        known = {t.sha256 for t in manifest.tensors}
        if any(w not in known for w in req.want):
            raise invalid("SliceStatus wants a tensor its manifest does not list")
    have = [] if has_model else await asyncio.to_thread(cache.have, req.want)
    partial = {} if has_model or req.query_only else cache.partial_bytes(s for s in req.want if s not in have)
    if not has_model and not req.query_only:
        cache.pin(INCOMING, req.want)  # what is about to be loaded must not be evicted for the rest of it
    return pb.SliceStatusReply(
        has_model=has_model,
        have=have,
        cache_bytes=cache.total_bytes,
        cache_limit=cache.limit,
        partial=[pb.ShipPartial(sha256=k, bytes=v) for k, v in partial.items()],
    )


def _write(f, digest, data: bytes) -> None:
    f.write(data)
    digest.update(data)


async def ship_slice(cache: SliceCache, chunks: AsyncIterator[pb.SliceChunk]) -> pb.ShipSliceReply:
    """Receive tensors chunk by chunk into the cache (see the module docstring); the reply lists them."""
    reply = pb.ShipSliceReply()
    manifest: Manifest | None = None
    sha, part, f, expected, size = "", None, None, 0, 0
    try:
        async for chunk in chunks:
            if manifest is None or chunk.manifest_id and chunk.manifest_id != manifest.id:
                manifest = await asyncio.to_thread(cache.manifest, chunk.manifest_id)
                if manifest is None:
                    raise WireError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"unknown slice manifest {chunk.manifest_id[:12]!r}; send it with SliceStatus first",
                    )
                sizes = {t.sha256: t.nbytes for t in manifest.tensors}
            if chunk.sha256 != sha:  # a new tensor begins
                if f is not None:
                    raise invalid(f"tensor {sha[:12]} ended without its last chunk")
                if chunk.sha256 not in sizes:
                    raise invalid(f"tensor {chunk.sha256[:12]!r} is not in manifest {manifest.id[:12]}")
                sha, expected, size = chunk.sha256, sizes[chunk.sha256], chunk.offset
                if chunk.offset == 0:
                    part = await asyncio.to_thread(cache.begin, sha)
                    digest = hashlib.sha256()  # hashed as it arrives: admission need not read the file again
                else:  # resuming inside a tensor a broken stream cut off (SliceStatusReply.partial)
                    try:
                        part, digest = await asyncio.to_thread(cache.resume, sha, chunk.offset)
                    except (OSError, ValueError):
                        raise invalid(
                            f"tensor {sha[:12]} resumes at byte {chunk.offset}, more than this node holds; "
                            "ask SliceStatus again"
                        ) from None
                f = open(part, "ab")  # noqa: SIM115 - stays open across chunks
            if chunk.offset != size or size + len(chunk.data) > expected:
                raise invalid(
                    f"tensor {sha[:12]}: chunk at {chunk.offset} does not follow byte {size} of {expected}"
                )
            await asyncio.to_thread(_write, f, digest, chunk.data)
            size += len(chunk.data)
            reply.bytes_received += len(chunk.data)
            if chunk.last:
                f.close()
                f = None
                try:
                    await asyncio.to_thread(cache.admit, sha, part, expected, digest.hexdigest())
                    reply.admitted.append(sha)
                except HashMismatchError as e:
                    log.warning("ShipSlice: %s; dropped, asking for it again", e)
                    reply.rejected.append(sha)
                except CacheFullError as e:
                    raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
                sha = ""
    finally:
        if f is not None:  # the stream broke inside a tensor: what arrived stays, the next stream resumes it
            f.close()
    return reply


async def read_slice(
    cache: SliceCache, req: pb.ReadSliceRequest, model_dir: Path
) -> AsyncIterator[pb.SliceChunk]:
    """Stream the requested tensors this node holds, each from its offset, in ShipSlice's chunks: from the
    slice cache (objects verified as `SliceCache.have` does), else from the model file in `model_dir` when the
    manifest's model is there and the tensor of that name has the manifest's size. The receiving node checks
    every tensor's SHA-256 before admitting it, whichever node sent it."""
    manifest = await asyncio.to_thread(cache.manifest, req.manifest_id)
    if manifest is None:
        raise WireError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"unknown slice manifest {req.manifest_id[:12]!r}; send it with SliceStatus first",
        )
    if len(req.tensors) > MAX_WANT:
        raise invalid("ReadSlice names too many tensors")
    entries = {t.sha256: t for t in manifest.tensors}
    for t in req.tensors:
        if t.sha256 not in entries:
            raise invalid(f"tensor {t.sha256[:12]!r} is not in manifest {manifest.id[:12]}")
        if t.bytes > entries[t.sha256].nbytes:
            raise invalid(
                f"tensor {t.sha256[:12]}: offset {t.bytes} is past its {entries[t.sha256].nbytes} bytes"
            )
    held = set(await asyncio.to_thread(cache.have, [t.sha256 for t in req.tensors]))
    file_view = None
    for t in req.tensors:
        entry = entries[t.sha256]
        if t.sha256 in held:
            path, base = cache.path(t.sha256), 0
        else:
            if file_view is None:
                file_view = await asyncio.to_thread(_model_file_tensors, manifest.model, model_dir)
            where = file_view.get(entry.name)
            if where is None or where[2] != entry.nbytes:
                raise WireError(
                    grpc.StatusCode.NOT_FOUND,
                    f"this node does not hold tensor {entry.name} ({t.sha256[:12]})",
                )
            path, base = where[0], where[1]
        with open(path, "rb") as f:
            off = t.bytes
            while True:
                n = min(CHUNK_BYTES, entry.nbytes - off)
                data = await asyncio.to_thread(_read_at, f, base + off, n) if n else b""
                if len(data) != n:
                    raise WireError(grpc.StatusCode.DATA_LOSS, f"tensor {entry.name}: {path} ended early")
                yield pb.SliceChunk(
                    manifest_id=manifest.id,
                    sha256=t.sha256,
                    offset=off,
                    data=data,
                    last=off + n >= entry.nbytes,
                )
                off += n
                if off >= entry.nbytes:
                    break


CHUNK_BYTES = 1 << 20  # as the coordinator's ShipSlice chunks (coordinator/pipeline/ship.py)


def _read_at(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _model_file_tensors(model: str, model_dir: Path) -> dict[str, tuple[Path, int, int]]:
    """name -> (file, byte offset, bytes) of the tensors of `model` in `model_dir` (a GGUF file), or {}."""
    from edgeshard.node.weights.gguf_file import GGUFFile

    try:
        path = resolve_in_model_dir(model, model_dir, False)
        if not path.is_file():
            return {}
        reader = GGUFFile(path)
        return {t.name: (path, t.data_offset, t.n_bytes) for t in reader.tensors}
    except (WireError, CheckpointError, OSError, ValueError):
        return {}


PULL_ROUNDS = 4  # ReadSlice streams per PullSlice before giving up (each resumes where the last one stopped)
PULL_IDLE_S = 60.0  # a source that sends nothing for this long is given up on (the stream is resumed)


async def pull_slice(
    cache: SliceCache, req: pb.PullSliceRequest, security=None
) -> AsyncIterator[pb.PullSliceProgress]:
    """Fetch `req.want` from the node at `req.source` (its ReadSlice) into the cache, as ShipSlice would
    receive them from the coordinator; yields progress, the last message `done` with what was admitted."""
    from edgeshard.node.security.channels import channel
    from edgeshard.node.service.shard_load import _HOST_PORT
    from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc

    manifest = await asyncio.to_thread(cache.manifest, req.manifest_id)
    if manifest is None:
        raise WireError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"unknown slice manifest {req.manifest_id[:12]!r}; send it with SliceStatus first",
        )
    m = _HOST_PORT.match(req.source)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise invalid(f"source {req.source!r} is not host:port")
    if len(req.want) > MAX_WANT:
        raise invalid("PullSlice wants too many tensors")
    sizes = {t.sha256: t.nbytes for t in manifest.tensors}
    want = list(dict.fromkeys(req.want))
    if any(w not in sizes for w in want):
        raise invalid(f"PullSlice wants a tensor manifest {manifest.id[:12]} does not list")
    admitted: list[str] = []
    rejected: list[str] = []
    received = 0
    total = None
    ch = channel(req.source, security)
    try:
        stub = pb_grpc.NodeStub(ch)
        for _ in range(PULL_ROUNDS):
            have = set(await asyncio.to_thread(cache.have, want))
            todo = [w for w in want if w not in have]
            if not todo:
                break
            partial = cache.partial_bytes(todo)
            if total is None:
                total = sum(sizes[w] - partial.get(w, 0) for w in todo)
            call = stub.ReadSlice(
                pb.ReadSliceRequest(
                    manifest_id=manifest.id,
                    tensors=[pb.ShipPartial(sha256=w, bytes=partial.get(w, 0)) for w in todo],
                )
            )
            progress: asyncio.Queue = asyncio.Queue()

            async def counted(call=call, progress=progress) -> AsyncIterator[pb.SliceChunk]:
                nonlocal received
                while True:  # a source that stops sending must not hold the pull (and the deploy) forever
                    chunk = await asyncio.wait_for(call.read(), PULL_IDLE_S)
                    if chunk is grpc.aio.EOF:
                        return
                    received += len(chunk.data)
                    progress.put_nowait(received)
                    yield chunk

            task = asyncio.ensure_future(ship_slice(cache, counted()))
            while not task.done():
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    while not progress.empty():
                        progress.get_nowait()
                    yield pb.PullSliceProgress(bytes_received=received, bytes_total=total)
                else:
                    getter.cancel()
            try:
                reply = task.result()
            except TimeoutError:
                call.cancel()
                log.warning("PullSlice: %s sent nothing for %.0f s; resuming", req.source, PULL_IDLE_S)
                continue
            except grpc.aio.AioRpcError as e:
                if e.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.INTERNAL,
                ):
                    log.warning("PullSlice from %s broke (%s); resuming", req.source, e.code().name)
                    continue  # what arrived stays: the next round resumes inside the tensor in flight
                raise WireError(
                    e.code() if e.code() != grpc.StatusCode.UNAUTHENTICATED else grpc.StatusCode.UNAVAILABLE,
                    f"source {req.source}: {e.details()}",
                ) from None
            admitted += reply.admitted
            rejected += reply.rejected
        else:
            have = set(await asyncio.to_thread(cache.have, want))
            if any(w not in have for w in want):
                raise WireError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"source {req.source}: the tensors did not arrive whole in {PULL_ROUNDS} streams",
                )
    finally:
        await ch.close()
    yield pb.PullSliceProgress(
        bytes_received=received, bytes_total=total or 0, admitted=admitted, rejected=rejected, done=True
    )


async def slice_manifest_of(
    cache: SliceCache, req: pb.SliceManifestOfRequest, model_dir: Path
) -> pb.SliceManifest:
    """The manifest of the GGUF file `req.model` names in `model_dir` (recorded in the cache, so this node can
    serve its tensors to others with ReadSlice); NOT_FOUND when the file is not here."""
    from edgeshard.node.weights.slice import build_manifest

    try:
        path = await asyncio.to_thread(resolve_in_model_dir, req.model, model_dir, False)
    except WireError:
        raise WireError(
            grpc.StatusCode.NOT_FOUND, f"{req.model!r} is not in this node's --model-dir"
        ) from None
    if not path.is_file():
        raise WireError(grpc.StatusCode.NOT_FOUND, f"{req.model!r} here is not a GGUF file (only those ship)")
    try:
        manifest = await asyncio.to_thread(build_manifest, path, req.model)
    except (CheckpointError, OSError, ValueError) as e:
        raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot describe {req.model!r}: {e}") from None
    await asyncio.to_thread(cache.save_manifest, manifest)
    return manifest.to_pb()
