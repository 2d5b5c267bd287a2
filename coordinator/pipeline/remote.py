"""`RemotePipeline`: the `Pipeline` protocol of generate.py over a ring of nodes.

    coordinator --Forward(tokens)--> node 1 --> ... --> last node --Results(token)--> coordinator

One Forward stream to the first node and one Results stream from the last are opened once and reused for
every session and step (no per-token unary calls). A step writes one message and waits on a future keyed by
(session, start); a reader task resolves it from the Results stream. Errors arrive on either stream (the ring
carries them forward to Results, each node relays them back to its sender) and fail every pending future of
their session with a `ClusterError` naming the node and what went wrong.

A non-final prefill chunk (sample=False) is not waited for: the next chunk follows at once, so chunks
overlap across nodes; its acknowledgement is checked before the session's next sampled step returns.

The direct token feed: a session whose every next step is just its last sampled token (no speculation)
asks the last node to send each sampled token straight to the first node (`feed`, `ForwardMessage.feed`).
The coordinator still receives every token from the Results stream; `step` then only waits for the result
of the step the ring already runs (`Result.feeding` says it does), and `close` ends the session as before.
A ring of N nodes then costs N messages per token instead of N + 1, and the coordinator's wake-up is off
the critical path (docs/pipeline.md). Every session asks, however many run at once (see `feed`).

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
from edgeshard.node.service import hop_trace
from edgeshard.node.service.next_hop import coalesce, drain, now_us
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import sampling_to_wire, status_code

_OPEN = -1  # the pending key of a session's OpenSession (steps use their start position, >= 0)
_FAILED = -2  # the key under which a fed session keeps an error that came while nobody waited


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
        feed: bool = True,
        feed_results_every: int = 4,
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
        # the direct token feed (see the module docstring): whether to ask for it, the sessions that asked,
        # and per fed session the results that came before anyone waited for them (by start; _FAILED: error)
        self.feed_enabled = feed
        self.feed_results_every = feed_results_every  # TokenFeed.results_every (see the proto)
        self.feed_asked: dict[str, pb.TokenFeed] = {}
        self.fed: dict[str, dict[int, pb.Result | ClusterError]] = {}
        self.fed_next: dict[str, int] = {}  # fed session -> start of the step the ring runs without us
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

    def feed(self, session_id: str, stop_ids: Sequence[int], until: int) -> bool:
        """Ask the last node to feed `session_id`'s sampled tokens straight back to the first node from its
        next sampled step on, stopping where the generation loop stops: at a token in `stop_ids` or a
        position >= `until`. Only a session whose next steps are exactly its sampled tokens may ask
        (generate() without speculation). Returns whether it will be asked.

        Also with many sessions at once: a session's first decode step goes out with its group
        (coordinator/pipeline/groups.py) and from then on the group stays together without the coordinator,
        because the last node feeds a batch's tokens to the first node as one burst, which the first node
        computes as one batch (at most 1/N of the sessions: node/service/batching.py). Measured
        (docs/pipeline.md): the same batches and throughput as unfed, 20-30% less coordinator CPU per token."""
        if not self.feed_enabled:
            return False
        self.feed_asked[session_id] = pb.TokenFeed(
            first_node=self.clients[0].address,
            until=until,
            stop_ids=list(stop_ids),
            results_every=self.feed_results_every,
        )
        return True

    async def step(self, session_id: str, start: int, tokens: list[int], sample: bool = True) -> int | None:
        """Feed `tokens` at `start` to the ring; the sampled next token (None for sample=False, not awaited)."""
        if sample and len(tokens) == 1 and self.fed_next.get(session_id) == start:
            return await self._fed_step(session_id, start)  # the last node sent it to node 1 itself
        msg = pb.ForwardMessage(plan_id=self.plan_id, session_id=session_id, start=start, sample=sample)
        msg.tokens.ids.extend(tokens)
        if sample and (feed := self.feed_asked.pop(session_id, None)) is not None:
            msg.feed.CopyFrom(feed)
            self.fed[session_id] = {}  # its results may now come before anyone waits for them
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
        if result.feeding:
            self.fed_next[session_id] = start + len(tokens)
        hop_trace.mark("c.return", session_id, start)
        return int(result.token)

    async def _fed_step(self, session_id: str, start: int) -> int:
        """The token of the step at `start` that the ring runs on its own (the token feed)."""
        del self.fed_next[session_id]
        early = self.fed.get(session_id, {})
        result = early.pop(start, None)
        if result is None:
            failed = early.pop(_FAILED, None)
            if isinstance(failed, ClusterError):
                raise failed
            result = await self._expect(session_id, start)
        if result.feeding:
            self.fed_next[session_id] = start + 1
        hop_trace.mark("c.return", session_id, start)
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
        self.feed_asked.pop(session_id, None)
        self.fed.pop(session_id, None)
        self.fed_next.pop(session_id, None)
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
        hop_trace.mark("c.put", msg.session_id, msg.start)
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
        elif session_id in self.fed:  # a fed step's, before anyone waits for it
            self.fed[session_id][key] = result

    def _fail_session(self, session_id: str, error: ClusterError) -> None:
        futures = self.pending.pop(session_id, {}).values()
        if session_id in self.fed and not futures:  # nobody waits now: the next fed step raises it
            self.fed[session_id][_FAILED] = error
            self.pending[session_id] = {}  # still open: its later results are still taken
        for fut in futures:
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
            hop_trace.mark("c.result", r.session_id, r.start)
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
