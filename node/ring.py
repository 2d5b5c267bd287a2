"""A node's place in the ring: take a message, run the stage, hand the result to the next hop.

`RingNode` holds the loaded shard (a `ShardExecutor`), the long-lived stream to the next node (`NextHop`), the
Results subscribers (last node), and the routing of error replies back to whoever sent a session's messages.
The gRPC servicer (node/server.py) is a thin layer over it. The data path, one message:

    decode + validate (wire_tensors) -> executor.step -> encode -> next_hop.send    (middle node)
                                                      -> Result to the subscriber  (last node)

Compute runs inline on the event loop: a decode step of one sequence is strictly serial around the ring, so
handing it to a thread would only add a wake-up. (Batching the steps that are ready, a later issue, drains
several messages here before calling `executor.step` once.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from .config import ShardSpec
from .executor import SessionError, ShardExecutor, StepError
from .limits import check_forward
from .next_hop import GRPC_OPTIONS, NextHop, now_us
from .wire import edgeshard_pb2 as pb
from .wire_tensors import (
    TO_WIRE_DTYPE,
    WireError,
    error_message,
    invalid,
    sampling_from_wire,
    step_from_wire,
    tensor_to_wire,
)

log = logging.getLogger("edgeshard.node")

LAST = "last"  # LoadShardRequest.next_hop of the node that samples
ReplyFn = Callable[[pb.ForwardReply], None]  # puts an error reply on the sender's stream (never blocks)
__all__ = [
    "GRPC_OPTIONS",
    "LAST",
    "LoadedShard",
    "NextHop",
    "RingNode",
    "now_us",
]  # GRPC_OPTIONS: re-exported


@dataclass
class LoadedShard:
    """What a node serves now: the executor of its layer range and where results go."""

    executor: ShardExecutor
    model: str  # the reference it was loaded from
    quant: str
    plan_id: int
    next_hop: str  # host:port, or LAST
    weight_bytes: int
    load_s: float

    @property
    def spec(self) -> ShardSpec:
        """The layer range."""
        return self.executor.spec

    def info(self) -> pb.ShardInfo:
        """The shard as GetInfo/LoadShard report it."""
        cfg = self.executor.stage.config
        return pb.ShardInfo(
            model=self.model,
            start_layer=self.spec.start_layer,
            end_layer=self.spec.end_layer,
            num_layers=self.spec.num_layers,
            quant=self.quant,
            plan_id=self.plan_id,
            weight_bytes=self.weight_bytes,
            next_hop=self.next_hop,
            load_s=self.load_s,
            wire_dtype=TO_WIRE_DTYPE[self.executor.stage.dtype],
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
        )


class RingNode:
    """The node's state and its message handling, independent of the gRPC servicer around it."""

    def __init__(self, name: str, max_sessions: int = 64) -> None:
        self.name = name
        self.max_sessions = max_sessions
        self.shard: LoadedShard | None = None
        self.loading = False
        self.next_hop: NextHop | None = None
        self.subscribers: dict[str, asyncio.Queue] = {}  # Results streams on this (last) node
        self.route: dict[str, str] = {}  # session -> subscriber its results go to
        self.upstream: dict[str, ReplyFn] = {}  # session -> the stream its messages came from
        self.messages = 0
        self.errors = 0
        self.network_s = 0.0

    # ---------------------------------------------------------------------------------- shard lifecycle

    async def install(self, shard: LoadedShard) -> None:
        """Serve `shard` from now on (its plan id fences off messages of older plans)."""
        await self.unload()
        self.shard = shard
        if shard.next_hop != LAST:
            self.next_hop = NextHop(shard.next_hop, self._relay_reply, self._hop_failed)

    async def unload(self) -> None:
        """Drop the shard, its sessions and the stream to the next hop."""
        self.shard = None
        self.route.clear()
        self.upstream.clear()
        if self.next_hop is not None:
            await self.next_hop.close()
            self.next_hop = None

    def _require_shard(self, msg: pb.ForwardMessage) -> LoadedShard:
        shard = self.shard
        if shard is None:
            state = "is still loading its shard" if self.loading else "has no shard loaded"
            raise WireError(
                grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} {state}; send LoadShard first"
            )
        if msg.plan_id != shard.plan_id:
            raise invalid(
                f"stale plan id {msg.plan_id}: node {self.name} serves plan {shard.plan_id}; "
                "re-plan and reload the shards"
            )
        return shard

    # ---------------------------------------------------------------------------------- the data path

    async def handle(self, msg: pb.ForwardMessage, reply: ReplyFn) -> None:
        """Serve one Forward message that arrived on a stream whose error replies go to `reply`."""
        self.messages += 1
        which = msg.WhichOneof("payload")
        if msg.sent_at_us and which in ("tokens", "hidden"):  # the hop into this node (see the proto)
            self.network_s += max(0, now_us() - msg.sent_at_us) / 1e6
        if which == "error":  # an upstream failure: carry it on, whatever plan it names
            self._emit(msg)
            return
        try:
            check_forward(msg)  # ids it would keep (node/limits.py)
            shard = self._require_shard(msg)
        except WireError as e:  # not of this ring (stale plan, no shard), or too big: answer the sender only
            self._refuse(msg, e, reply)
            return
        try:
            if which in ("tokens", "hidden"):
                out = self._step(shard, msg)
                self.upstream[msg.session_id] = reply  # errors of the next hops about it go back there
            elif which == "open":
                out = self._open(shard, msg)
                self.upstream[msg.session_id] = reply  # (only sessions this node holds: no unbounded growth)
            elif which == "end":
                shard.executor.close_session(msg.session_id)
                out = msg
            else:
                raise invalid("a Forward message needs a payload: tokens, hidden, open, end or error")
        except WireError as e:
            self._refuse(msg, e, reply)
            out = error_message(msg, e.to_proto(self.name))
        except Exception as e:  # a bug or a torch failure: fail this message, keep serving the others
            log.exception("step of session %r failed", msg.session_id)
            err = WireError(
                grpc.StatusCode.INTERNAL, f"node {self.name} failed the step: {type(e).__name__}: {e}"
            )
            self._refuse(msg, err, reply)
            out = error_message(msg, err.to_proto(self.name))
        self._emit(out)
        if which == "end":
            self.upstream.pop(msg.session_id, None)

    def _step(self, shard: LoadedShard, msg: pb.ForwardMessage) -> pb.ForwardMessage | pb.Result:
        ex = shard.executor
        cfg = ex.stage.config
        t0 = time.perf_counter()
        req = step_from_wire(msg, ex.spec.is_first, cfg.hidden_size, cfg.vocab_size)
        self.network_s += time.perf_counter() - t0
        try:
            (res,) = ex.step([req])
        except (SessionError, StepError) as e:
            raise invalid(str(e)) from None
        except MemoryError as e:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"node {self.name} ran out of memory: {e}"
            ) from e
        if ex.spec.is_last:
            return pb.Result(
                kind=pb.RESULT_TOKEN,
                plan_id=msg.plan_id,
                session_id=msg.session_id,
                start=msg.start,
                sampled=res.token is not None,
                token=res.token or 0,
            )
        t0 = time.perf_counter()
        out = pb.ForwardMessage(
            plan_id=msg.plan_id, session_id=msg.session_id, start=msg.start, sample=msg.sample
        )
        tensor_to_wire(res.hidden, out.hidden)
        self.network_s += time.perf_counter() - t0
        return out

    def _open(self, shard: LoadedShard, msg: pb.ForwardMessage) -> pb.ForwardMessage | pb.Result:
        if not msg.session_id:
            raise invalid("OpenSession needs a session_id")
        sampling = sampling_from_wire(msg.open.sampling)
        ex = shard.executor
        if msg.open.max_len and msg.open.max_len > ex.max_len:
            raise invalid(f"max_len {msg.open.max_len} exceeds this node's context length {ex.max_len}")
        try:
            ex.open_session(msg.session_id, sampling)
        except OverflowError as e:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        if not ex.spec.is_last:
            return msg
        self.route[msg.session_id] = msg.open.reply_to
        return pb.Result(kind=pb.RESULT_OPENED, plan_id=msg.plan_id, session_id=msg.session_id)

    def _refuse(self, msg: pb.ForwardMessage, e: WireError, reply: ReplyFn) -> None:
        self.errors += 1
        log.info("refused a message of session %r: %s", msg.session_id, e.message)
        reply(
            pb.ForwardReply(
                plan_id=msg.plan_id, session_id=msg.session_id, start=msg.start, error=e.to_proto(self.name)
            )
        )

    def _emit(self, out: pb.ForwardMessage | pb.Result) -> None:
        """Hand a node's output on: a Result to the subscriber (last node), else a message to the next hop."""
        if isinstance(out, pb.ForwardMessage) and (self.shard is None or self.shard.next_hop == LAST):
            out = self._as_result(out)
        if isinstance(out, pb.Result):
            self._publish(out)
            return
        if self.next_hop is None:  # no shard: an error with nowhere to go was already answered upstream
            return
        out.sent_at_us = now_us()
        self.next_hop.send(out)

    def _hop_failed(self, msg: pb.ForwardMessage, e: WireError) -> None:
        """The next hop could not take `msg`: tell whoever sent that session's messages here."""
        upstream = self.upstream.get(msg.session_id)
        self._refuse(msg, e, upstream if upstream is not None else lambda _reply: None)

    def _as_result(self, msg: pb.ForwardMessage) -> pb.Result:
        which = msg.WhichOneof("payload")
        if which == "error":
            return pb.Result(
                kind=pb.RESULT_ERROR,
                plan_id=msg.plan_id,
                session_id=msg.session_id,
                start=msg.start,
                error=msg.error,
            )
        return pb.Result(
            kind=pb.RESULT_ENDED, plan_id=msg.plan_id, session_id=msg.session_id, start=msg.start
        )

    def _publish(self, result: pb.Result) -> None:
        result.sent_at_us = now_us()
        sub = self.route.get(result.session_id)
        if result.kind == pb.RESULT_ENDED:
            self.route.pop(result.session_id, None)
        queue = self.subscribers.get(sub) if sub else None
        targets = [queue] if queue is not None else list(self.subscribers.values())
        for q in targets:  # no route (unknown session or reply_to ""): every coordinator filters its own
            q.put_nowait(result)

    def _relay_reply(self, reply: pb.ForwardReply) -> None:
        """An error reply from the next hop goes back to whoever sent that session's messages here."""
        upstream = self.upstream.get(reply.session_id)
        if upstream is not None:
            upstream(reply)

    # ---------------------------------------------------------------------------------- Results

    def subscribe(self, subscriber: str) -> asyncio.Queue:
        """Register a Results stream; its queue receives the results routed to it."""
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribers[subscriber] = queue
        return queue

    def unsubscribe(self, subscriber: str, queue: asyncio.Queue) -> None:
        """Forget a Results stream (only if it was not replaced by a newer one of the same name)."""
        if self.subscribers.get(subscriber) is queue:
            del self.subscribers[subscriber]

    def stats(self) -> pb.NodeStats:
        """Counters for GetInfo."""
        ex = self.shard.executor if self.shard else None
        return pb.NodeStats(
            steps=ex.steps if ex else 0,
            messages=self.messages,
            compute_ms=(ex.compute_s if ex else 0.0) * 1e3,
            network_ms=self.network_s * 1e3,
            errors=self.errors,
            sessions=len(ex.sessions) if ex else 0,
            kv_bytes=ex.kv_bytes() if ex else 0,
        )
