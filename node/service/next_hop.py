"""The node's long-lived stream to the next node of the ring, and the gRPC options every hop uses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from edgeshard.node.security.channels import Security, channel, connection_problem
from edgeshard.node.service import hop_trace
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.tensors import WireError

log = logging.getLogger("edgeshard.node")


MAX_BATCH_BYTES = 4 * 1024 * 1024  # a coalesced message stays far below MAX_MESSAGE_BYTES


def drain(queue: asyncio.Queue, first) -> list:
    """`first` and everything else waiting in `queue` now (without waiting for more)."""
    items = [first]
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def coalesce(messages: list, kind: type, now: int) -> list:
    """`messages` (ForwardMessage or Result, in order) as few messages of `kind` as the size cap allows:
    runs of several become one message whose `batch` holds them (see the proto), a lone one goes as it is.
    One gRPC message per group and hop: each costs ~0.1-0.3 ms of Python and gRPC on both ends."""
    if len(messages) == 1:  # the common case at one request: nothing to pack, no size to compute
        return messages
    out, run, size = [], [], 0
    for msg in messages:
        n = msg.ByteSize()
        if run and size + n > MAX_BATCH_BYTES:
            out.append(run[0] if len(run) == 1 else kind(batch=run, sent_at_us=now))
            run, size = [], 0
        run.append(msg)
        size += n
    if run:
        out.append(run[0] if len(run) == 1 else kind(batch=run, sent_at_us=now))
    return out


class NextHop:
    """One long-lived Forward stream to the next node, reopened once when it breaks.

    `send` only queues: a writer task writes the queue in order, so the node goes back to its own input
    while gRPC completes the write (the completion needs a wake-up of the event loop; awaiting it inline
    would delay the next message by that much). What queued up meanwhile (the outputs of one batched
    forward) goes as one message (`coalesce`). A message that cannot be written even after reconnecting
    goes to `on_failure`; error replies the next node sends back go to `on_reply` (the ring relays both
    upstream). When the stream breaks under messages already written (the next node died or went away),
    those are lost without a word: `on_break` hears of it, so the ring can fail their sessions upstream
    at once instead of leaving the coordinator to wait for its step deadline.
    """

    def __init__(
        self,
        address: str,
        on_reply: Callable[[pb.ForwardReply], None],
        on_failure: Callable[[pb.ForwardMessage, WireError], None],
        metadata=(),
        security: Security | None = None,
        on_break: Callable[[WireError], None] | None = None,
    ) -> None:
        self.address = address
        self.on_break = on_break  # the stream broke with messages possibly in flight (see the docstring)
        self.security = (
            security  # cluster key or INSECURE (node/security/channels.py); None: the process's mode
        )
        self.on_reply = on_reply
        self.on_failure = on_failure
        self.metadata = tuple(metadata)  # room for auth (a later issue): sent on every stream
        self.channel: grpc.aio.Channel | None = None
        self.call = None
        self.reader: asyncio.Task | None = None
        self.queue: asyncio.Queue[pb.ForwardMessage] = asyncio.Queue()
        self.writer: asyncio.Task | None = None

    def send(self, msg: pb.ForwardMessage) -> None:
        """Queue `msg` for the next node (FIFO, never blocks)."""
        if self.writer is None:
            self.writer = asyncio.create_task(self._write_loop())
        self.queue.put_nowait(msg)

    async def _write_loop(self) -> None:
        while True:
            queued = drain(self.queue, await self.queue.get())
            for msg in coalesce(queued, pb.ForwardMessage, now_us()):
                try:
                    await self._write(msg)
                except WireError as e:
                    for one in msg.batch or [msg]:
                        self.on_failure(one, e)

    async def _open(self) -> None:
        if self.channel is None:
            self.channel = channel(self.address, self.security)  # TLS + call tokens unless --insecure
        stub = pb_grpc.NodeStub(self.channel)
        # fail fast (no wait_for_ready): a dead next node must become an UNAVAILABLE reply, not a hang
        self.call = stub.Forward(metadata=self.metadata)
        self.reader = asyncio.create_task(self._read(self.call))

    async def _read(self, call) -> None:
        try:
            async for reply in call:
                self.on_reply(reply)
            why = "it closed the stream"  # a long-lived stream ends only when the next node goes away
        except asyncio.CancelledError:
            return  # we closed it ourselves (reset, close)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return
            why = connection_problem(e.details()) or (e.details() or e.code().name).splitlines()[0][:160]
        # the next write reopens the stream; what was written before the break may be lost with it
        if self.on_break is not None:
            self.on_break(
                WireError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the stream to the next node {self.address} broke ({why}); steps in flight there are lost",
                )
            )

    async def _write(self, msg: pb.ForwardMessage) -> None:
        """Write `msg`; reopen the stream and retry once if it broke; WireError(UNAVAILABLE) if that fails."""
        why = None
        for attempt in (1, 2):
            if self.call is None or self.call.done():
                await self._reset()
                await self._open()
            try:
                if hop_trace.enabled():
                    hop_trace.mark("write", msg.session_id, msg.start)
                await self.call.write(msg)
                if hop_trace.enabled():
                    hop_trace.mark("written", msg.session_id, msg.start)
                return
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
                log.warning(
                    "stream to next hop %s broke (%s); %s",
                    self.address,
                    e,
                    "reconnecting" if attempt == 1 else "giving up",
                )
                self.call = None
                why = connection_problem(e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e))
        raise WireError(
            grpc.StatusCode.UNAVAILABLE,
            f"the next node {self.address} is unreachable"
            + (f" ({why})" if why else "; restart it or load a new plan"),
        )

    async def _reset(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None
        if self.call is not None:
            self.call.cancel()
            self.call = None

    async def close(self) -> None:
        """Stop writing, close the stream and the channel (queued messages are dropped)."""
        if self.writer is not None:
            self.writer.cancel()
            self.writer = None
        await self._reset()
        if self.channel is not None:
            await self.channel.close()
            self.channel = None


def now_us() -> int:
    """Wall-clock microseconds, the unit of `sent_at_us` stamps."""
    return time.time_ns() // 1000
