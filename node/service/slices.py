"""SliceStatus and ShipSlice: a node receives the tensors of its stage from the coordinator (weight shipping).

The coordinator asks first (`slice_status`): the node records the manifest, says whether it holds the model
file itself (then nothing ships) and which of the wanted tensors its cache already holds, verified. Then it
streams the rest (`ship_slice`); each tensor is written to a partial file as its chunks arrive and admitted
when the last one has come and the bytes hash to the manifest's SHA-256. A mismatch is reported back and the
coordinator sends that tensor again; a stream that breaks loses only the tensor in flight.
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
    if not has_model:
        cache.pin(INCOMING, req.want)  # what is about to be loaded must not be evicted for the rest of it
    return pb.SliceStatusReply(
        has_model=has_model, have=have, cache_bytes=cache.total_bytes, cache_limit=cache.limit
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
                if chunk.offset != 0:
                    raise invalid(f"tensor {chunk.sha256[:12]} starts at offset {chunk.offset}, not 0")
                sha, expected, size = chunk.sha256, sizes[chunk.sha256], 0
                part = await asyncio.to_thread(cache.begin, sha)
                f = open(part, "r+b")  # noqa: SIM115 - stays open across chunks
                digest = hashlib.sha256()  # hashed as it arrives: admission need not read the file again
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
        if f is not None:  # the stream broke inside a tensor: it starts over next time
            f.close()
            part.unlink(missing_ok=True)
    return reply
