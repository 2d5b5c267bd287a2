"""`RemotePipeline`: the `Pipeline` protocol of generate.py over a ring of nodes.

    coordinator --Forward(tokens)--> node 1 --> ... --> last node --Results(token)--> coordinator

One Forward stream to the first node and one Results stream from the last are opened once and reused for
every session and step (no per-token unary calls). A step writes one message and waits on a future keyed by
(session, start); a reader task resolves it from the Results stream. Errors arrive on either stream (the ring
carries them forward to Results, each node relays them back to its sender) and fail every pending future of
their session with a `ClusterError` naming the node and what went wrong.

A non-final prefill chunk (sample=False) is not waited for: the next chunk follows at once, so chunks
overlap across nodes; its acknowledgement is checked before the session's next sampled step returns.

Many sessions run at once: their decode steps go out in one group per node (coordinator/pipeline/groups.py), so each
node computes one group's steps in one batched forward while the others compute the other groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence

import grpc

from edgeshard.coordinator.errors import ClusterError
from edgeshard.coordinator.pipeline.groups import StepGroups
from edgeshard.coordinator.pipeline.stage_client import NodeUnavailableError, StageClient
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.service.next_hop import coalesce, drain, now_us
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import sampling_to_wire, status_code

_OPEN = -1  # the pending key of a session's OpenSession (steps use their start position, >= 0)


class RemoteStepError(ClusterError):
    """A node refused or failed a session's message; `grpc_code` is its gRPC status code."""

    def __init__(self, error: pb.Error) -> None:
        self.grpc_code = status_code(error.code)
        self.node = error.node
        super().__init__(f"node {error.node or '?'}: {error.message} ({self.grpc_code.name})")


class RemotePipeline:
    """Runs sessions on the ring `clients` (pipeline order) for plan `plan_id`."""

    def __init__(
        self,
        clients: Sequence[StageClient],
        plan_id: int,
        subscriber: str | None = None,
        groups: int | None = None,
    ) -> None:
        if not clients:
            raise ValueError("a pipeline needs at least one node")
        self.clients = list(clients)
        self.plan_id = plan_id
        self.subscriber = subscriber or f"coordinator-{uuid.uuid4().hex[:12]}"
        self.pending: dict[str, dict[int, asyncio.Future]] = {}  # session -> key -> future
        self.unchecked: dict[str, list[asyncio.Future]] = {}  # sent prefill chunks not yet awaited
        self.stream = None
        self.tasks: list[asyncio.Task] = []
        self.broken: ClusterError | None = None
        self.outbox: asyncio.Queue[pb.ForwardMessage] = asyncio.Queue()  # see _write
        # decode steps travel in groups, one per node by default (None: as many as nodes)
        self.groups = StepGroups(groups or len(self.clients), self._put)
        self.return_hop_s = 0.0  # network time of the last hop (last node -> here), summed over results
        self.return_hops = 0

    async def start(self) -> None:
        """Open the Results stream (and wait until it is registered) and the Forward stream."""
        results = self.clients[-1].results(self.subscriber, self.plan_id)
        first = await anext(results)  # the node registers us before it sends READY
        if first.kind != pb.RESULT_READY:
            raise ClusterError(f"node {self.clients[-1].address} opened Results with {first}, expected READY")
        self.stream = self.clients[0].forward()
        self.tasks = [
            asyncio.create_task(self._read_results(results)),
            asyncio.create_task(self._read_replies()),
            asyncio.create_task(self._write_loop()),
        ]

    async def aclose(self) -> None:
        """Close both streams (the nodes keep their shards)."""
        with contextlib.suppress(TimeoutError):  # let queued messages (EndSession) go out first
            await asyncio.wait_for(self.outbox.join(), 2.0)
        for task in self.tasks:
            task.cancel()
        if self.stream is not None:
            with contextlib.suppress(Exception):
                await self.stream.done_writing()
            self.stream.cancel()
        self._fail_all(ClusterError("the pipeline was closed"))

    # ------------------------------------------------------------------------------------- Pipeline

    async def open(self, session_id: str, sampling: SamplingParams, max_len: int = 0) -> None:
        """Open the session on every node for up to `max_len` positions (0: the context length; nodes with a KV
        budget reserve that much); returns once the last node has it."""
        msg = pb.ForwardMessage(
            plan_id=self.plan_id,
            session_id=session_id,
            open=pb.OpenSession(
                sampling=sampling_to_wire(sampling), reply_to=self.subscriber, max_len=max_len
            ),
        )
        await self._send_and_wait(session_id, _OPEN, msg)

    async def step(self, session_id: str, start: int, tokens: list[int], sample: bool = True) -> int | None:
        """Feed `tokens` at `start` to the ring; the sampled next token (None for sample=False, not awaited)."""
        msg = pb.ForwardMessage(plan_id=self.plan_id, session_id=session_id, start=start, sample=sample)
        msg.tokens.ids.extend(tokens)
        if not sample:
            fut = self._expect(session_id, start)
            await self._write(msg)
            self.unchecked.setdefault(session_id, []).append(fut)
            return None
        if len(tokens) == 1:  # a decode step: it goes out with its group (coordinator/pipeline/groups.py)
            fut = self._expect(session_id, start)
            self.groups.submit(session_id, msg)
            result = await fut
        else:
            result = await self._send_and_wait(session_id, start, msg)
        for fut in self.unchecked.pop(session_id, ()):
            await fut  # earlier chunks of this session: done before this one (the ring is FIFO)
        return int(result.token)

    async def verify(self, session_id: str, start: int, tokens: list[int], draft: list[int]) -> list[int]:
        """Feed `tokens` then the `draft` proposals at `start`; the last node checks the proposals and answers
        with the accepted ones and its own next token (speculative decoding; node/model/sampling.py)."""
        msg = pb.ForwardMessage(plan_id=self.plan_id, session_id=session_id, start=start, sample=True)
        msg.tokens.ids.extend([*tokens, *draft])
        msg.draft.extend(draft)
        result = await self._send_and_wait(session_id, start, msg)
        for fut in self.unchecked.pop(session_id, ()):
            await fut
        if (
            not result.tokens
        ):  # a node that does not check proposals (PROTOCOL_VERSION < 3) sampled after them
            raise ClusterError(
                "the last node did not check the proposed tokens; update edgeshard on the nodes"
            )
        return [int(t) for t in result.tokens]

    async def close(self, session_id: str) -> None:
        """End the session on every node (not awaited: the ring frees it in order after the last step)."""
        self.groups.leave(session_id)
        for fut in self.unchecked.pop(session_id, ()):
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: the session is over, nobody will await this chunk's outcome
        for fut in self.pending.pop(session_id, {}).values():
            fut.cancel()
        if self.broken is None and self.stream is not None:
            with contextlib.suppress(Exception):
                await self._write(
                    pb.ForwardMessage(plan_id=self.plan_id, session_id=session_id, end=pb.EndSession())
                )

    # ------------------------------------------------------------------------------------- internals

    def _expect(self, session_id: str, key: int) -> asyncio.Future:
        if self.broken is not None:
            raise self.broken
        fut = asyncio.get_running_loop().create_future()
        self.pending.setdefault(session_id, {})[key] = fut
        return fut

    async def _write(self, msg: pb.ForwardMessage) -> None:
        """Queue `msg` for the Forward stream: gRPC allows one write in flight per stream, and concurrent
        sessions write at once; the writer task sends them in order (and nobody waits for completions)."""
        if self.broken is not None:
            raise self.broken
        self._put(msg)

    def _put(self, msg: pb.ForwardMessage) -> None:
        msg.sent_at_us = now_us()  # node 1 counts the hop from here (see the proto)
        self.outbox.put_nowait(msg)

    async def _write_loop(self) -> None:
        while True:
            queued = drain(self.outbox, await self.outbox.get())  # a group's burst goes as one message
            try:
                for msg in coalesce(queued, pb.ForwardMessage, now_us()):
                    await self.stream.write(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the stream is gone
                detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
                self._fail_all(
                    NodeUnavailableError(self.clients[0].address, (detail or "").splitlines()[0][:200])
                )
            finally:
                for _ in queued:
                    self.outbox.task_done()

    async def _send_and_wait(self, session_id: str, key: int, msg: pb.ForwardMessage) -> pb.Result:
        fut = self._expect(session_id, key)
        await self._write(msg)
        return await fut

    def _resolve(self, session_id: str, key: int, result: pb.Result) -> None:
        fut = self.pending.get(session_id, {}).pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def _fail_session(self, session_id: str, error: ClusterError) -> None:
        for fut in self.pending.pop(session_id, {}).values():
            if not fut.done():
                fut.set_exception(error)

    def _fail_all(self, error: ClusterError) -> None:
        self.broken = self.broken or error
        for session_id in list(self.pending):
            self._fail_session(session_id, error)

    async def _read_results(self, results) -> None:
        try:
            async for message in results:
                for r in message.batch or [message]:  # several results in one (see the proto)
                    self._take_result(r)
            self._fail_all(ClusterError(f"node {self.clients[-1].address} closed the Results stream"))
        except ClusterError as e:
            self._fail_all(e)

    def _take_result(self, r: pb.Result) -> None:
        """Resolve or fail the session one result is about."""
        if r.session_id not in self.pending or (r.plan_id and r.plan_id != self.plan_id):
            # another coordinator's session, an end ack, one we stopped waiting for, or an older plan's
            # (epoch fencing: a session replayed after a failure must not fail by its past)
            return
        if r.kind == pb.RESULT_TOKEN:
            if r.sent_at_us:
                self.return_hop_s += max(0, now_us() - r.sent_at_us) / 1e6
                self.return_hops += 1
            self._resolve(r.session_id, r.start, r)
            self.groups.returned(r.session_id)
        elif r.kind == pb.RESULT_OPENED:
            self._resolve(r.session_id, _OPEN, r)
        elif r.kind == pb.RESULT_ERROR:
            self._fail_session(r.session_id, RemoteStepError(r.error))

    async def _read_replies(self) -> None:
        try:
            async for reply in self.stream:
                if reply.plan_id and reply.plan_id != self.plan_id:
                    continue  # about an older plan's message, relayed by session: not this plan's failure
                if not reply.session_id:  # about the whole plan (another coordinator took the node over)
                    self._fail_all(ClusterError(reply.error.message or "the first node dropped this plan"))
                    continue
                self._fail_session(reply.session_id, RemoteStepError(reply.error))
            self._fail_all(ClusterError(f"node {self.clients[0].address} closed the Forward stream"))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            self._fail_all(
                NodeUnavailableError(self.clients[0].address, (e.details() or "").splitlines()[0][:200])
            )
