"""Weight shipping, the coordinator's side: get a node the tensors of its stage that it lacks.

`ship_stage` asks the node what it holds (`SliceStatus`, which also hands it the manifest). Tensors another
node holds (`peers`: a survivor serving a spare after a re-placement, or any node of the cluster whose cache
or model file has them) are pulled by the node from that peer directly (`PullSlice`; the peer's `ReadSlice`):
they do not cross the coordinator's link, which every node it ships to shares. The rest is streamed from the
coordinator's file over `ShipSlice` in chunks of `CHUNK_BYTES`; gRPC flow control paces the stream to the
link and to the node's disk. The node admits each tensor once its SHA-256 matches, so after a broken stream
the next round (`ROUNDS` in all) sends only what was not admitted, starting a tensor that was cut off at the
byte where it stopped (`SliceStatusReply.partial`); a tensor that arrived corrupted is sent again whole.
Nothing ships to a node that holds the model file itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgeshard.coordinator.errors import ClusterError
from edgeshard.coordinator.pipeline.stage_client import GrpcStageClient
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.weights.slice import Manifest, TensorEntry, build_manifest, manifest_wants
from edgeshard.node.wire import edgeshard_pb2 as pb

CHUNK_BYTES = 1 << 20  # one gRPC message of tensor bytes; flow control keeps a few in flight
ROUNDS = 4  # SliceStatus + ShipSlice rounds before giving up (broken streams, rejected tensors)
log = logging.getLogger("edgeshard.coordinator")


@dataclass
class ShipReport:
    """What shipping one stage to one node did."""

    needed_bytes: int = 0  # bytes of the stage's tensors
    shipped_bytes: int = 0  # bytes sent (0: the node had them all, or holds the model file)
    cached_bytes: int = 0  # of needed_bytes, what the node's cache already held
    seconds: float = 0.0
    rounds: int = 0
    rejected: int = 0  # tensors that arrived corrupted and were sent again
    has_model: bool = False  # the node holds the model file: it loads from that, nothing shipped
    from_peers_bytes: int = 0  # of shipped_bytes, what the node pulled from other nodes (PullSlice)
    resumed_bytes: int = 0  # bytes of tensors cut off mid-stream that were not sent again (resumed)
    peers: tuple[str, ...] = ()  # the nodes it pulled from

    @property
    def rate(self) -> float:
        """Bytes per second while shipping (0 when nothing shipped)."""
        return self.shipped_bytes / self.seconds if self.shipped_bytes and self.seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "needed_bytes": self.needed_bytes,
            "shipped_bytes": self.shipped_bytes,
            "cached_bytes": self.cached_bytes,
            "ship_s": round(self.seconds, 3),
            "rate_bytes_per_s": round(self.rate),
            "rejected": self.rejected,
            "has_model": self.has_model,
            "from_peers_bytes": self.from_peers_bytes,
            "resumed_bytes": self.resumed_bytes,
            "peers": list(self.peers),
        }


async def manifest_for(path: Path, model_ref: str) -> Manifest:
    """The manifest of the GGUF file at `path` (hashing it takes a while the first time; memoized)."""
    return await asyncio.to_thread(build_manifest, path, model_ref)


def _chunks(
    manifest: Manifest,
    path: Path,
    tensors: list[TensorEntry],
    cut_after: int | None,
    start: dict[str, int] | None = None,
) -> Iterator[pb.SliceChunk]:
    """The chunks of `tensors` from the file at `path`, each tensor from byte `start[sha]` (0 when absent)."""
    from edgeshard.node.weights.gguf_file import GGUFFile

    reader = GGUFFile(path)
    where = {t.name: t for t in reader.tensors}
    n = 0
    for entry in tensors:
        info = where[entry.name]
        view = memoryview(reader._buf)[info.data_offset : info.data_offset + info.n_bytes]
        first = (start or {}).get(entry.sha256, 0)
        for off in range(first, max(first + 1, entry.nbytes), CHUNK_BYTES):
            if cut_after is not None and n >= cut_after:
                raise _Cut
            data = bytes(view[off : off + CHUNK_BYTES])
            if corrupt_once is not None and entry.sha256 in corrupt_once and data:  # test hook
                corrupt_once.discard(entry.sha256)
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            n += 1
            yield pb.SliceChunk(
                manifest_id=manifest.id,
                sha256=entry.sha256,
                offset=off,
                data=data,
                last=off + CHUNK_BYTES >= entry.nbytes,
            )


class _Cut(Exception):
    """The test hook `cut_after` broke the stream."""


# Test hooks (tests/test_ship.py): break the next stream after this many chunks; flip a byte of these tensors
# once on the way (the node must reject them by their hash and get them again).
cut_next_stream_after: int | None = None
corrupt_once: set[str] | None = None
after_cut: Callable[[], None] | None = (
    None  # called once the cut stream is cancelled (tests touch the node's disk)
)


async def _pull_from_peers(
    client: GrpcStageClient,
    model_ref: str,
    manifest: Manifest,
    missing: list[str],
    peers: Sequence[GrpcStageClient],
    report: ShipReport,
    on_bytes: Callable[[int], None],
) -> None:
    """Have the node behind `client` pull the tensors of `missing` that other nodes hold, each from the first
    peer that holds it (asked with SliceStatus(query_only): verified, nothing reserved there). A peer that
    fails is logged and skipped: the coordinator's file covers what did not arrive."""
    left = list(missing)
    for peer in peers:
        if not left or peer.address == client.address:
            continue
        try:
            status = await peer.stub.SliceStatus(
                pb.SliceStatusRequest(manifest=manifest.to_pb(), model=model_ref, want=left, query_only=True),
                metadata=peer.metadata,
                timeout=60,
            )
        except grpc.aio.AioRpcError as e:
            log.info("shipping: peer %s cannot say what it holds (%s)", peer.address, e.code().name)
            continue
        held = left if status.has_model else [s for s in left if s in set(status.have)]
        if not held:
            continue
        base = report.shipped_bytes
        try:
            call = client.stub.PullSlice(
                pb.PullSliceRequest(manifest_id=manifest.id, source=peer.address, want=held),
                metadata=client.metadata,
            )
            async for p in call:
                report.shipped_bytes = base + p.bytes_received
                on_bytes(report.shipped_bytes)
                if p.done:
                    report.rejected += len(p.rejected)
        except grpc.aio.AioRpcError as e:
            log.warning("shipping: %s could not pull from %s: %s", client.address, peer.address, e.details())
            continue
        finally:
            report.from_peers_bytes += report.shipped_bytes - base
        report.peers = (*report.peers, peer.address)
        left = [s for s in left if s not in set(held)]


async def ship_stage(
    client: GrpcStageClient,
    model_ref: str,
    manifest: Manifest,
    path: Path | None,
    spec: ShardSpec,
    on_progress: Callable[[int, int], None] | None = None,
    peers: Sequence[GrpcStageClient] = (),
) -> ShipReport:
    """Make sure the node behind `client` holds the tensors of `spec` (see the module docstring).

    `peers`: other nodes that may hold some of them (tried first, in order); `path`: the coordinator's copy of
    the file for the rest (None: peers only). `on_progress(done, total)` gets bytes as they are handed to gRPC
    or reported pulled (the node has them soon after: flow control bounds what is in flight). Raises
    ClusterError when the node refuses, nobody holds a tensor, or the rounds run out.
    """
    global cut_next_stream_after, after_cut
    want = manifest_wants(manifest, spec)
    sizes = {t.sha256: t.nbytes for t in manifest.tensors}
    report = ShipReport(needed_bytes=sum(sizes[s] for s in want))
    t0 = time.perf_counter()
    total = None
    tried_peers = False

    def progress(done: int) -> None:
        if on_progress is not None:
            on_progress(done, max(total or 0, done))

    for report.rounds in range(1, ROUNDS + 1):
        try:
            status = await client.stub.SliceStatus(
                pb.SliceStatusRequest(manifest=manifest.to_pb(), model=model_ref, want=want),
                metadata=client.metadata,
                timeout=60,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older node: it must hold the file itself
                report.has_model = True
                return report
            raise client._error(e, "SliceStatus") from None
        if status.has_model:
            report.has_model = True
            return report
        have = set(status.have)
        missing = [s for s in want if s not in have]
        partial = {p.sha256: p.bytes for p in status.partial if 0 < p.bytes < sizes.get(p.sha256, 0)}
        if report.rounds == 1:
            report.cached_bytes = report.needed_bytes - sum(sizes[s] for s in missing)
            total = sum(sizes[s] - partial.get(s, 0) for s in missing)
        else:
            report.resumed_bytes += sum(partial.values())
        if not missing:
            break

        if peers and not tried_peers:
            tried_peers = True
            await _pull_from_peers(client, model_ref, manifest, missing, peers, report, progress)
            continue  # ask again: what arrived, what is left for the file
        if path is None:
            raise ClusterError(
                f"node {client.address} lacks {len(missing)} tensors of {model_ref!r} that no other node "
                "holds, and this coordinator has no copy of the file; give --model a GGUF file"
            )
        by_hash = {t.sha256: t for t in manifest.tensors}
        tensors = [by_hash[s] for s in missing]
        cut, cut_next_stream_after = cut_next_stream_after, None
        call = client.stub.ShipSlice(metadata=client.metadata)
        try:
            for chunk in _chunks(manifest, path, tensors, cut, partial):
                report.shipped_bytes += len(chunk.data)
                await call.write(chunk)
                progress(report.shipped_bytes)
            await call.done_writing()
            reply = await call
        except _Cut:  # the test hook: a link that breaks once what was written has arrived
            await asyncio.sleep(0.5)
            call.cancel()
            await asyncio.sleep(0.1)  # let the node see the cancellation before the next round asks
            hook, after_cut = after_cut, None
            if hook is not None:
                hook()
            continue
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL):
                continue  # a broken stream: ask again what arrived and send the rest
            raise client._error(e, f"the tensors of {model_ref!r}") from None
        report.rejected += len(reply.rejected)
        if not reply.rejected and len(reply.admitted) == len(set(missing)):
            break
    else:
        raise ClusterError(
            f"node {client.address}: shipping the tensors of {model_ref!r} did not complete in {ROUNDS} rounds"
        )
    report.seconds = time.perf_counter() - t0
    return report
