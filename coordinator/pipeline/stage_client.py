"""The coordinator's connection to one node: the `StageClient` seam and its gRPC implementation.

A `StageClient` is what the ring driver needs from a node: its info, loading a shard, the Forward stream (to
the first node) and the Results stream (from the last one). `GrpcStageClient` speaks the edgeshard.v1
protocol; connection failures become `NodeUnavailableError` naming the address, which the CLI prints as one
line. Channels are TLS with per-call membership tokens (node/security/channels.py); a node of another cluster (or
with a stale key) is a `NotAMemberError`. `metadata` is sent on every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import grpc

from edgeshard.coordinator.errors import ClusterError
from edgeshard.node.security.channels import Security, channel, connection_problem
from edgeshard.node.security.channels import current as current_security
from edgeshard.node.wire import PROTOCOL_VERSION
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.options import GRPC_OPTIONS

CONNECT_TIMEOUT_S = 10.0


class NodeUnavailableError(ClusterError):
    """A node cannot be reached at its address (not running, wrong port, firewall)."""

    def __init__(self, address: str, detail: str = "") -> None:
        self.address = address
        why = f" ({detail})" if detail else ""
        super().__init__(
            f"node {address} is not reachable{why}; start it there with `edgeshard node --port "
            f"{address.rsplit(':', 1)[-1]}` or fix the address in --peers"
        )


class NotAMemberError(ClusterError):
    """The node and this coordinator do not share a cluster key (TLS or the call token failed)."""

    def __init__(self, address: str, detail: str) -> None:
        self.address = address
        super().__init__(f"node {address} is not a member of this cluster: {detail}")


class ForwardStream(Protocol):
    """A Forward stream: write messages; iterate the error replies."""

    async def write(self, msg: pb.ForwardMessage) -> None: ...

    def __aiter__(self) -> AsyncIterator[pb.ForwardReply]: ...

    def cancel(self) -> bool: ...


class StageClient(Protocol):
    """One node, as the coordinator sees it."""

    address: str

    async def info(self) -> pb.NodeInfo: ...

    async def load(
        self, request: pb.LoadShardRequest, on_progress: Callable[[pb.LoadProgress], None]
    ) -> pb.ShardInfo: ...

    def forward(self) -> ForwardStream: ...

    def results(self, subscriber: str, plan_id: int) -> AsyncIterator[pb.Result]: ...

    async def close(self) -> None: ...


class GrpcStageClient:
    """A StageClient over one gRPC channel."""

    def __init__(
        self, address: str, metadata: Sequence[tuple[str, str]] = (), security: Security | None = None
    ) -> None:
        self.address = address
        self.metadata = tuple(metadata)
        # TLS + per-call membership tokens with the cluster key (None: this process's configured mode)
        self.channel = channel(address, security, GRPC_OPTIONS)
        self.stub = pb_grpc.NodeStub(self.channel)
        self.security = security

    def _error(self, e: grpc.aio.AioRpcError, doing: str) -> ClusterError:
        # with our mode: a plaintext call a keyed node hangs up on says "Socket closed", which only means
        # "not a member" when we are the --insecure side
        why = connection_problem(e.details(), self.security or current_security())
        if why is not None or e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return NotAMemberError(self.address, why or _short(e.details()))
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return NodeUnavailableError(self.address, _short(e.details()))
        if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # e.g. held by another coordinator: its words
            return ClusterError(e.details() or f"node {self.address} refused {doing}")
        return ClusterError(f"node {self.address} refused {doing}: {e.details()} ({e.code().name})")

    async def info(self, timeout: float = CONNECT_TIMEOUT_S) -> pb.NodeInfo:
        """GetInfo; checks the node speaks our protocol version."""
        try:
            info = await self.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise self._error(e, "GetInfo") from None
        if info.protocol_version != PROTOCOL_VERSION:
            raise ClusterError(
                f"node {self.address} speaks protocol v{info.protocol_version}, this coordinator "
                f"v{PROTOCOL_VERSION}; run the same edgeshard version on both"
            )
        return info

    async def load(
        self, request: pb.LoadShardRequest, on_progress: Callable[[pb.LoadProgress], None]
    ) -> pb.ShardInfo:
        """LoadShard, feeding each progress message to `on_progress`; the loaded shard's info."""
        try:
            async for progress in self.stub.LoadShard(request, metadata=self.metadata):
                on_progress(progress)
                if progress.done:
                    return progress.shard
        except grpc.aio.AioRpcError as e:
            raise self._error(e, f"to load {request.model!r}") from None
        raise ClusterError(f"node {self.address} ended LoadShard without finishing; see its log")

    def forward(self) -> ForwardStream:
        """Open the long-lived Forward stream (to the first node)."""
        return self.stub.Forward(metadata=self.metadata)

    async def results(self, subscriber: str, plan_id: int) -> AsyncIterator[pb.Result]:
        """The Results stream of the last node, from its READY message on."""
        call = self.stub.Results(
            pb.ResultsRequest(subscriber=subscriber, plan_id=plan_id), metadata=self.metadata
        )
        try:
            async for result in call:
                yield result
        except grpc.aio.AioRpcError as e:
            raise self._error(e, "the Results stream") from None
        finally:
            call.cancel()

    async def release(self, plan_id: int, timeout: float = 2.0) -> bool:
        """Let go of the node if it still runs our plan `plan_id` (it keeps its shard); False when it was not
        ours (any more) or did not answer."""
        from edgeshard.coordinator.pipeline.holder import holder_id

        try:
            reply = await self.stub.ReleasePlan(
                pb.ReleasePlanRequest(coordinator_id=holder_id(), plan_id=plan_id),
                timeout=timeout,
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.released

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()


def _short(details: str | None) -> str:
    """The first line of a gRPC error detail, without the C-core's debug tail."""
    return (details or "").splitlines()[0][:200] if details else ""


async def connect(
    addresses: Sequence[str], metadata: Sequence[tuple[str, str]] = (), security: Security | None = None
) -> tuple[list[GrpcStageClient], list[pb.NodeInfo]]:
    """Clients for `addresses` and their GetInfo, all at once; NodeUnavailableError for the first unreachable.
    `security`: the cluster key or INSECURE (None: this process's, node/security/channels.py)."""
    clients = [GrpcStageClient(a, metadata, security) for a in addresses]
    results = await asyncio.gather(*(c.info() for c in clients), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(c.close() for c in clients))
        raise errors[0]
    return clients, list(results)
