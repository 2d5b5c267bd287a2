"""A node's place in the ring: take a message, run the stage, hand the result to the next hop.

`RingNode` holds the loaded shard (a `ShardExecutor`), the long-lived stream to the next node (`NextHop`), the
Results subscribers (last node), and the routing of error replies back to whoever sent a session's messages.
The gRPC servicer (node/service/server.py) is a thin layer over it. The data path:

    handle: decode + validate (wire_tensors) -> inbox
    stage loop: take ALL ready messages (node/service/batching.py) -> run_batch: one executor.step (node/service/stage_step.py)
                -> encode -> next_hop.send (middle node) / Result to the subscriber (last node)

The direct token feed (docs/pipeline.md): for a session that asked (`ForwardMessage.feed`), the last node sends
each sampled token straight to the first node as the next step (`_feed`), and holds the Results back in small
groups (`_hold`), so the coordinator is off the critical path of every token.

Continuous batching: while the stage computes, messages keep arriving and queue in the inbox; when it is free
it takes everything ready (at most one step per session, one chunk of prefill rows, `max_batch_rows` rows and 1/N of
its sessions on an N-node ring) and runs one forward, so with many sequences in flight every node computes a
group of them at the same time (see node/service/batching.py and coordinator/pipeline/groups.py).

Compute runs in one worker thread (`compute="thread"`, the default) so the event loop keeps reading and
decoding messages during a forward and the next batch is ready when it ends; with a single session nothing
else can arrive, so it runs inline (no hand-off). `compute="inline"` always runs it on the event loop
(messages are read between batches). Measured in docs/pipeline.md: the thread saves ~10% of CPU per token at
8 sequences; a hand-off per forward cost ~3 ms per token at 1. Batches run one at a time, so the executor is
only ever touched by one of them (GetInfo reads counters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import grpc
import torch

from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.executor import ShardExecutor
from edgeshard.node.service import hop_trace
from edgeshard.node.service.batching import STEP_KINDS, Pending, StageTimes, group_size, take_batch
from edgeshard.node.service.next_hop import NextHop, now_us
from edgeshard.node.service.node_args import COMPUTE_MODES, MAX_BATCH_ROWS, SESSION_IDLE_S
from edgeshard.node.service.stage_step import Outcome, run_batch
from edgeshard.node.weights.loader import stage_kernels
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.limits import MAX_QUEUED_MESSAGES, MAX_QUEUED_ROWS, check_forward
from edgeshard.node.wire.tensors import TO_WIRE_DTYPE, WireError, error_message, invalid, step_from_wire

log = logging.getLogger("edgeshard.node")

LAST = "last"  # LoadShardRequest.next_hop of the node that samples
KV_AVAILABLE_FRACTION = 0.5  # default KV budget: this share of the memory available once the weights are in
# a session whose upstream node's stream closed (that node died, or moved to a new plan) waits this long for a
# recovery to resume it (node/service/recover.py) before it is ended; a coordinator's closed stream ends at once
ORPHAN_S = 60.0
INLINE_MAX_ROWS = 16  # a lone session's step runs on the event loop only up to this many rows (see _run)
BURST_WAIT_S = 0.002  # longest a node waits for the rest of an arriving burst before it starts a forward
RESULTS_HOLD_S = 0.05  # longest the last node holds a fed session's results (TokenFeed.results_every)
ReplyFn = Callable[[pb.ForwardReply], None]  # puts an error reply on the sender's stream (never blocks)
__all__ = ["LAST", "LoadedShard", "NextHop", "RingNode"]


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
    stages: int = 0  # nodes in the ring (LoadShardRequest.stages; 0: unknown), for batching's group size

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
            wire_dtype=TO_WIRE_DTYPE[torch.float32],  # the residual stream (Stage.forward)
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            kv_bytes_per_position=self.executor.bytes_per_position,  # KV + kept boundary row
            kv_budget=self.executor.kv_budget,
            kept_bytes_per_position=self.executor.kept_bytes_per_position,
            kernels=stage_kernels(self.executor.stage),  # what the loaded layers run on
        )


def _nobody(_reply: pb.ForwardReply) -> None:
    """Where replies to a message the node made itself go (an end of a reaped session)."""


class RingNode:
    """The node's state and its message handling, independent of the gRPC servicer around it."""

    def __init__(
        self,
        name: str,
        max_sessions: int = 64,
        *,
        kv_budget: int = 0,
        memory_limit: int = 0,
        max_batch_rows: int = MAX_BATCH_ROWS,
        compute: str = "thread",
        session_idle_s: float = SESSION_IDLE_S,
    ) -> None:
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
        self.name = name
        self.max_sessions = max_sessions
        self.kv_budget = kv_budget  # bytes of KV caches sessions may reserve (0: see kv_budget_for)
        self.memory_limit = memory_limit  # bytes for weights + KV (--memory-limit; 0: no limit)
        self.max_batch_rows = max_batch_rows
        self.session_idle_s = session_idle_s  # 0: sessions never time out
        self.reaper: asyncio.Task | None = None  # ends idle sessions (see _reap_idle)
        self.reaped = 0  # sessions ended because their stream closed or they sat idle
        self.orphan_s = ORPHAN_S
        self.orphans: dict[str, float] = {}  # session -> when it is ended unless a recovery resumes it
        # one compute thread: the event loop keeps reading (and decoding) messages while the stage computes
        self.worker = (
            ThreadPoolExecutor(1, thread_name_prefix="edgeshard-stage") if compute == "thread" else None
        )
        self.inbox: deque[Pending] = deque()  # messages waiting for the stage, in arrival order
        self.ready = asyncio.Event()  # set when the inbox gets a message
        self.room = asyncio.Event()  # set while the inbox is below its bounds (node/wire/limits.py)
        self.room.set()
        self.queued_rows = 0  # rows of the steps in the inbox
        self.burst_left = 0  # messages still on their way of the burst that is arriving (ForwardMessage)
        self.runner: asyncio.Task | None = None  # the stage loop of the installed shard
        self.times = StageTimes()
        self.shard: LoadedShard | None = None
        self.loading = False
        self.next_hop: NextHop | None = None
        self.subscribers: dict[str, asyncio.Queue] = {}  # Results streams on this (last) node
        self.route: dict[str, str] = {}  # session -> subscriber its results go to
        self.upstream: dict[str, ReplyFn] = {}  # session -> the stream its messages came from
        # the direct token feed (last node): session -> where and until when its tokens go to the first node,
        # and one stream per first node (see _feed)
        self.feeds: dict[str, pb.TokenFeed] = {}
        self.feed_hops: dict[str, NextHop] = {}
        self.fed = 0  # steps this (last) node sent to the first node itself
        self.held: dict[str, list[pb.Result]] = {}  # fed results not yet published (TokenFeed.results_every)
        self.messages = 0
        self.frames = 0  # gRPC messages: a batch counts once
        self.errors = 0
        self.network_s = 0.0

    # ---------------------------------------------------------------------------------- shard lifecycle

    async def install(self, shard: LoadedShard) -> None:
        """Serve `shard` from now on (its plan id fences off messages of older plans)."""
        await self.unload()
        self.shard = shard
        self._orphan(list(shard.executor.sessions))  # sessions carried over from the last plan (recovery)
        self.times = StageTimes()
        self.runner = asyncio.create_task(self._run(shard))
        if self.session_idle_s > 0:
            self.reaper = asyncio.create_task(self._reap_idle(shard))
        if shard.next_hop != LAST:
            self.next_hop = NextHop(
                shard.next_hop, self._relay_reply, self._hop_failed, on_break=self._hop_broke
            )

    async def unload(self) -> None:
        """Drop the shard, its sessions and the stream to the next hop."""
        self.shard = None
        if self.runner is not None:  # a batch computing now finishes in the thread; its outputs are dropped
            self.runner.cancel()
            self.runner = None
        if self.reaper is not None:
            self.reaper.cancel()
            self.reaper = None
        self.inbox.clear()  # messages of the old plan
        self.queued_rows = 0
        self.room.set()
        self.route.clear()
        self.upstream.clear()
        if self.next_hop is not None:
            await self.next_hop.close()
            self.next_hop = None
        await self._close_feeds()

    def kv_budget_for(self, weight_bytes: int) -> int:
        """The KV budget of a shard with `weight_bytes` of weights: --kv-budget, else what --memory-limit leaves
        after the weights, else KV_AVAILABLE_FRACTION of the memory available now (called once the weights
        are loaded, so they are no longer counted as available).

        Never unlimited: a node without a budget once accepted 64 sessions reserving 6 GB, more than a Pi has;
        with one, a session that cannot fit is refused when it opens (RESOURCE_EXHAUSTED, saying why) instead
        of the node swapping or being killed mid-generation. Half, not all: the OS, the page cache of the
        model file and the activations of a batch need the rest."""
        if self.kv_budget:
            return self.kv_budget
        if not self.memory_limit:
            import psutil

            return max(1, int(psutil.virtual_memory().available * KV_AVAILABLE_FRACTION))
        left = self.memory_limit - weight_bytes
        if left <= 0:
            log.warning("--memory-limit leaves no room for KV caches after %d bytes of weights", weight_bytes)
        return max(1, left)  # 1, not 0 (no limit): every session is refused, saying why

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

    # ---------------------------------------------------------------------------------- ending sessions

    def stream_closed(self, reply: ReplyFn, from_node: bool = False) -> int:
        """The Forward stream whose error replies went to `reply` has closed (its coordinator exited or
        crashed, or the node before this one died): end every session whose messages came on it, here and,
        by the ends going on along the ring, on every later node. Returns how many were ended.

        Without this a crashed coordinator's sessions held their KV reservations until the next reload, and a
        few crashes filled a small node. A session a live coordinator still uses is never reaped: its stream
        is open. (A coordinator that lost its stream rebuilds the ring and replays anyway.)

        `from_node`: the stream came from the node before (no coordinator id). Its closing is how a failure
        upstream, or the plan moving on, looks from here: the sessions are kept `orphan_s` for a recovery to
        resume them (`_orphan`), and ended only then."""
        ended = [s for s, r in self.upstream.items() if r == reply]
        if from_node:  # the node before died or moved on: a recovery may resume these (see _orphan)
            for session_id in ended:
                self.upstream.pop(session_id, None)
            self._orphan(ended)
            return len(ended)
        for session_id in ended:
            self._end_here(session_id, "its stream closed")
        return len(ended)

    # ---------------------------------------------------------------------------------- recovery

    def _orphan(self, sessions: list[str]) -> None:
        """`sessions` lost their sender (the node before died, or the plan changed and their caches were
        carried over): keep them `orphan_s` for a recovery to resume (node/service/recover.py: `adopted`),
        then end them. A node's stream closing is what a failure looks like from the nodes after it; ending
        those sessions at once threw away the caches a recovery could have kept."""
        if not sessions:
            return
        deadline = time.monotonic() + self.orphan_s
        for session_id in sessions:
            self.orphans[session_id] = deadline
        asyncio.get_running_loop().call_later(self.orphan_s + 0.01, self._end_orphans)

    def adopted(self, session_id: str, reply_to: str | None = None) -> None:
        """A recovery resumed `session_id` here (it is no orphan); on the last node its results go to
        `reply_to` (the new pipeline's Results subscriber)."""
        self.orphans.pop(session_id, None)
        if reply_to is not None and self.shard is not None and self.shard.next_hop == LAST:
            self.route[session_id] = reply_to

    def _end_orphans(self) -> None:
        now = time.monotonic()
        for session_id, deadline in list(self.orphans.items()):
            if deadline <= now:
                del self.orphans[session_id]
                if self.shard is not None and session_id in self.shard.executor.sessions:
                    self._end_here(session_id, f"no recovery resumed it within {self.orphan_s:g} s")

    async def _reap_idle(self, shard: LoadedShard) -> None:
        """End the sessions nobody has stepped for `session_idle_s` (a coordinator that opened and forgot
        them while keeping its stream, or one whose stream close this node never saw)."""
        every = max(0.05, min(60.0, self.session_idle_s / 4))
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for session_id, session in list(shard.executor.sessions.items()):
                if now - session.last_used > self.session_idle_s:
                    session.last_used = now  # one end per timeout, even if the stage is busy
                    self._end_here(session_id, f"it was idle for more than {self.session_idle_s:g} s")

    def _end_here(self, session_id: str, why: str) -> None:
        """Queue an end of `session_id` as if its sender had sent one: it runs in the session's order (after
        what is queued), frees the cache here and goes on to the next node."""
        shard = self.shard
        if shard is None:
            return
        log.info("ending session %r: %s", session_id, why)
        self.orphans.pop(session_id, None)
        self.reaped += 1
        msg = pb.ForwardMessage(plan_id=shard.plan_id, session_id=session_id, end=pb.EndSession())
        self.upstream.pop(session_id, None)  # the sender is gone: its replies have nowhere to go
        self.inbox.append(Pending(msg, _nobody, "end", arrived=time.perf_counter()))
        self.ready.set()

    # ---------------------------------------------------------------------------------- the data path

    async def handle(self, msg: pb.ForwardMessage, reply: ReplyFn) -> None:
        """Take one Forward message that arrived on a stream whose error replies go to `reply`: refuse it at
        once if it is not for this ring, else queue it for the stage loop (it runs in the next batch). A
        batch (several messages in one, see the proto) is taken message by message."""
        self.frames += 1
        if not msg.batch:
            await self._take(msg, reply)
            return
        if msg.WhichOneof("payload"):
            self._refuse(
                msg,
                invalid("a message with a batch carries no payload of its own: put it in the batch"),
                reply,
            )
            return
        for one in msg.batch:
            if one.batch:
                self._refuse(
                    one, invalid("a batch inside a batch: send the messages in one flat batch"), reply
                )
                continue
            await self._take(one, reply)

    async def _take(self, msg: pb.ForwardMessage, reply: ReplyFn) -> None:
        self.messages += 1
        which = msg.WhichOneof("payload") or ""
        hop_trace.mark("recv", msg.session_id, msg.start)
        t0 = time.perf_counter()
        if msg.sent_at_us and which in STEP_KINDS:  # the hop into this node (see the proto)
            self.network_s += max(0, now_us() - msg.sent_at_us) / 1e6
        shard = self.shard
        self.burst_left = msg.burst_left
        item = Pending(msg, reply, which, arrived=t0)
        if which == "error":  # an upstream failure: carry it on, whatever plan it names
            if shard is None:
                self._emit(msg)
                return
        else:
            try:
                check_forward(msg)  # ids it would keep (node/wire/limits.py)
                shard = self._require_shard(msg)
            except WireError as e:  # not of this ring (stale plan, no shard), or too big: answer the sender
                self._refuse(msg, e, reply)
                return
            if which in STEP_KINDS:  # decoded on arrival, while the compute thread runs the last batch
                cfg = shard.executor.stage.config
                try:
                    item.req = step_from_wire(msg, shard.spec.is_first, cfg.hidden_size, cfg.vocab_size)
                except WireError as e:
                    item.error = e  # answered in the session's order, like any other failure
                self.network_s += time.perf_counter() - t0
            elif which not in ("open", "end"):
                item.error = invalid("a Forward message needs a payload: tokens, hidden, open, end or error")
        self.inbox.append(item)
        self.queued_rows += item.req.length if item.req is not None else 0
        self.ready.set()
        hop_trace.mark("queued", msg.session_id, msg.start)
        if len(self.inbox) >= MAX_QUEUED_MESSAGES or self.queued_rows >= MAX_QUEUED_ROWS:
            self.room.clear()
            await self.room.wait()  # this stream is read again once the stage has caught up

    async def _run(self, shard: LoadedShard) -> None:
        """The stage loop: wait for work, take ALL that is ready as one batch (node/service/batching.py), run it in the
        compute thread, hand the outcomes on; until the shard is unloaded (the task is cancelled)."""
        loop = asyncio.get_running_loop()
        times = self.times
        while True:
            if not self.inbox:
                times.idle_since = time.perf_counter()
                self.ready.clear()
                await self.ready.wait()
                hop_trace.mark("woke")
                times.idle_s += time.perf_counter() - times.idle_since
                times.idle_since = None
            for _ in range(8 if self.worker is None else 0):  # inline: first let the streams deliver
                queued = len(self.inbox)  # what arrived during the last batch (a read takes a few turns)
                await asyncio.sleep(0)
                if len(self.inbox) == queued:
                    break
            if self.burst_left:
                await self._await_burst()
            cap = group_size(len(shard.executor.sessions), shard.stages)
            controls, steps = take_batch(self.inbox, self.max_batch_rows, cap)
            self.queued_rows -= sum(item.req.length for item in controls + steps if item.req is not None)
            if len(self.inbox) < MAX_QUEUED_MESSAGES and self.queued_rows < MAX_QUEUED_ROWS:
                self.room.set()
            if steps:
                times.record(steps, time.perf_counter())
                if hop_trace.enabled():
                    for item in steps:
                        hop_trace.mark("batch", item.msg.session_id, item.msg.start)
            work = partial(run_batch, shard.executor, self.name, controls, steps)
            # one session (or none): nothing else can arrive meanwhile, so skip the thread hand-off; but not
            # for a long step (a prefill chunk): on the event loop it would keep Health unanswered for its
            # whole length, and a coordinator probing a slow or busy node then takes it for hung
            rows = sum(item.req.length for item in steps if item.req is not None)
            inline = self.worker is None or (len(shard.executor.sessions) <= 1 and rows <= INLINE_MAX_ROWS)
            try:
                outcomes, encode_s = work() if inline else await loop.run_in_executor(self.worker, work)
            except Exception as e:  # run_batch answers for every message; this is a bug in it
                log.exception("a batch failed")
                err = WireError(grpc.StatusCode.INTERNAL, f"node {self.name} failed a batch: {e}")
                outcomes = [
                    Outcome(i, error_message(i.msg, err.to_proto(self.name)), err) for i in controls + steps
                ]
                encode_s = 0.0
            self.network_s += encode_s
            if hop_trace.enabled():
                for item in steps:
                    hop_trace.mark("computed", item.msg.session_id, item.msg.start)
            onward = [o.out for o in outcomes if isinstance(o.out, pb.ForwardMessage)]
            for i, out in enumerate(onward):  # one burst: the next node computes them together
                out.burst_left = len(onward) - 1 - i
            for outcome in outcomes:
                self._finish(shard, outcome)

    async def _await_burst(self) -> None:
        """Wait (at most BURST_WAIT_S) for the rest of a burst that is arriving: the steps a batch of the
        previous node made, written one after another, are computed together here too."""
        deadline = time.perf_counter() + BURST_WAIT_S
        while self.burst_left and (left := deadline - time.perf_counter()) > 0:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), left)
            except TimeoutError:
                return

    def _finish(self, shard: LoadedShard, outcome: Outcome) -> None:
        """Hand one message's outcome on: answer the sender if it failed, then pass the output along the ring."""
        item, msg = outcome.item, outcome.item.msg
        if outcome.error is not None:
            # a fed step's sender is the last node: its failure goes to the coordinator's stream instead
            reply = self.upstream.get(msg.session_id, _nobody) if msg.fed else item.reply
            self._refuse(msg, outcome.error, reply)
        elif (item.kind in STEP_KINDS or item.kind == "open") and not msg.fed:
            # errors of the next hops about it go back there (only sessions this node holds: bounded)
            self.upstream[msg.session_id] = item.reply
            self.orphans.pop(msg.session_id, None)  # stepped again: not an orphan any more
            if item.kind == "open" and shard.next_hop == LAST:
                self.route[msg.session_id] = msg.open.reply_to
        if outcome.out is not None:
            if isinstance(outcome.out, pb.Result) and outcome.out.kind == pb.RESULT_TOKEN:
                self._feed(item, outcome.out)  # before the Result: the next step is the critical path
            self._emit(outcome.out)
        if item.kind == "end":
            self.upstream.pop(msg.session_id, None)
            self.feeds.pop(msg.session_id, None)
            hop_trace.flush()

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
        hop_trace.mark("emit", out.session_id, out.start)
        self.next_hop.send(out)

    def _hop_failed(self, msg: pb.ForwardMessage, e: WireError) -> None:
        """The next hop could not take `msg`: tell whoever sent that session's messages here."""
        upstream = self.upstream.get(msg.session_id)
        self._refuse(msg, e, upstream if upstream is not None else lambda _reply: None)

    def _hop_broke(self, e: WireError) -> None:
        """The stream to the next hop broke: steps in flight there are lost. Fail every session routed through
        here upstream, so their coordinator recovers now rather than at its step deadline."""
        plan_id = self.shard.plan_id if self.shard else 0
        for session_id, upstream in list(self.upstream.items()):
            self._refuse(pb.ForwardMessage(plan_id=plan_id, session_id=session_id), e, upstream)

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

    def _publish(self, result: pb.Result, hold: bool = True) -> None:
        if hold and self.held and self._hold(result):
            return
        result.sent_at_us = now_us()
        hop_trace.mark("publish", result.session_id, result.start)
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

    # ---------------------------------------------------------------------------------- the token feed

    def _feed(self, item: Pending, result: pb.Result) -> None:
        """Last node: send the token just sampled for `item` straight to the first node as the session's next
        step, if the session asked for it (`ForwardMessage.feed`) and the coordinator's loop would go on
        (not a stop id, below `until`); mark `result.feeding` so the coordinator waits instead of sending.

        Why: in a serial ring every hop is a message plus an idle receiver waking up (0.35-0.55 ms of gRPC
        on a 2-vCPU VM, docs/pipeline.md). Feeding from here drops the coordinator's hop and wake-up from
        the critical path of every token; the coordinator still gets every token (the Result goes out
        after the fed step, held back in small groups: `_hold`) and can end the session at any time
        (EndSession; the first node then drops the fed step in flight)."""
        msg = item.msg
        if msg.HasField("feed"):
            self.feeds[msg.session_id] = msg.feed
        feed = self.feeds.get(msg.session_id)
        if feed is None or not result.sampled or len(result.tokens) or item.req is None:
            return
        pos = msg.start + item.req.length  # the sampled token's position
        if result.token in feed.stop_ids or pos >= feed.until:
            del self.feeds[msg.session_id]  # the coordinator stops here; nothing more to feed
            return
        hop = self.feed_hops.get(feed.first_node)
        if hop is None:
            hop = self.feed_hops[feed.first_node] = NextHop(
                feed.first_node, self._feed_refused, self._feed_failed
            )
        step = pb.ForwardMessage(
            plan_id=msg.plan_id, session_id=msg.session_id, start=pos, sample=True, fed=True
        )
        step.tokens.ids.append(result.token)
        step.sent_at_us = now_us()
        hop_trace.mark("feed", step.session_id, step.start)
        hop.send(step)
        self.fed += 1
        result.feeding = True
        # results of fed steps are held back (see _hold); not the first token (time to first token)
        if feed.results_every > 1 and msg.fed and msg.session_id not in self.held:
            self.held[msg.session_id] = []
            asyncio.get_running_loop().call_later(RESULTS_HOLD_S, self._release, msg.session_id)

    def _feed_failed(self, msg: pb.ForwardMessage, e: WireError) -> None:
        """The first node could not be reached with a fed step: fail the session at its coordinator."""
        self.feeds.pop(msg.session_id, None)
        self._fail_fed(msg, e.to_proto(self.name))

    def _fail_fed(self, about: pb.ForwardMessage | pb.ForwardReply, error: pb.Error) -> None:
        """Tell the coordinator a fed step of `about`'s session failed (it waits for that step's Result)."""
        self._publish(
            pb.Result(
                kind=pb.RESULT_ERROR,
                plan_id=about.plan_id,
                session_id=about.session_id,
                start=about.start,
                error=error,
            )
        )

    def _feed_refused(self, reply: pb.ForwardReply) -> None:
        """The first node refused a fed step before queueing it (stale plan, a limit): the coordinator waits
        for that step, so tell it (failures after queueing also come along the ring; a repeat is harmless)."""
        if reply.session_id in self.feeds:
            del self.feeds[reply.session_id]
            self._fail_fed(reply, reply.error)

    def _hold(self, result: pb.Result) -> bool:
        """Keep a fed step's Result back until its session has `results_every` (or its feed ends, or
        RESULTS_HOLD_S passed): whether it was kept. Anything else of the session releases what is held
        first, so the coordinator sees its results in order."""
        held = self.held.get(result.session_id)
        if held is None:
            return False
        feed = self.feeds.get(result.session_id)
        if result.feeding and result.kind == pb.RESULT_TOKEN and feed is not None:
            held.append(result)
            if len(held) < feed.results_every:
                return True
        self._release(result.session_id)
        return any(r is result for r in held)  # kept and now published with the rest

    def _release(self, session_id: str) -> None:
        """Publish what is held of `session_id` (one Results message: they are queued together)."""
        held = self.held.pop(session_id, None)
        for r in held or ():
            self._publish(r, hold=False)

    async def _close_feeds(self) -> None:
        self.held.clear()
        self.feeds.clear()
        hops, self.feed_hops = list(self.feed_hops.values()), {}
        for hop in hops:
            await hop.close()

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
            frames=self.frames,
            fed=self.fed,
            compute_ms=(ex.compute_s if ex else 0.0) * 1e3,
            network_ms=self.network_s * 1e3,
            errors=self.errors,
            sessions=len(ex.sessions) if ex else 0,
            kv_bytes=ex.kv_bytes() if ex else 0,
            kv_reserved=ex.kv_reserved if ex else 0,
            recovered_rows=ex.recovered_rows if ex else 0,
            kept_bytes=ex.kept_bytes() if ex else 0,
            **(self.times.to_stats() if ex else {}),
        )
