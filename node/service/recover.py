"""The node's side of a recovery that costs one stage's share of the context (issue #21, docs/recovery.md).

After a failure the coordinator loads a new plan (a new plan id). A node asked for the shard it already
holds keeps its weights and its sessions (`ShardExecutor.adopt`, node/service/shard_load.py), so for each
session in flight the coordinator then calls `Recover` on the nodes of the new plan:

- KEEP on a survivor whose layers did not change: it must still hold the session's first `positions`
  positions (and, not the last node, the boundary rows it sent for them); it drops what lies beyond (the
  call in flight, which the coordinator retries) and the session is no orphan any more.
- FILL on a node that lost the session (a replacement, or a survivor whose layer range moved): it opens the
  session afresh and computes its own layers over the rows it is given (token ids on the first node, the
  previous node's boundary rows on the others), call by call as they were first fed, without sampling and
  without passing anything on. The same rows in the same shapes compute the same bits: the cache equals
  the uninterrupted run's, and the boundary rows it keeps in turn are those the next node received.
- FEED_NEXT on the node before a FILLed one: it streams its kept boundary rows to its next hop as a FILL.
  The rows go node to node (what a replacement needs is next door), not through the coordinator.

Only the layers that were lost are computed again: a survivor's cost is a check, the replacement's is its
own layers over the context. Every failure answers with a gRPC status (WireError): the coordinator then
falls back to the full replay (coordinator/recovery/resilient.py), so a refused Recover never costs a token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc

from edgeshard.node.model.executor import SessionError, ShardExecutor, StepError, StepRequest
from edgeshard.node.security.channels import channel
from edgeshard.node.service.ring import RingNode
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.limits import MAX_ID_CHARS
from edgeshard.node.wire.tensors import (
    WireError,
    invalid,
    sampling_from_wire,
    tensor_from_wire,
    tensor_to_wire,
    tokens_from_wire,
)

FEED_TIMEOUT_S = 600.0  # a FILL of the next node: its layers over the whole context, on a slow board


async def recover(node: RingNode, messages: AsyncIterator[pb.RecoverMessage]) -> pb.RecoverReply:
    """Serve one Recover stream (see the module docstring); raises WireError saying what was refused."""
    head = await anext(aiter(messages), None)
    if head is None:
        raise invalid("a Recover stream needs at least its header message")
    shard = node.shard
    if shard is None:
        raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"node {node.name} has no shard loaded")
    if head.plan_id != shard.plan_id:
        raise invalid(f"stale plan id {head.plan_id}: node {node.name} serves plan {shard.plan_id}")
    if not head.session_id or len(head.session_id) > MAX_ID_CHARS:
        raise invalid(f"a session id of 1..{MAX_ID_CHARS} characters is needed")
    ex = shard.executor
    reply_to = head.open.reply_to if head.HasField("open") else None
    try:
        if head.action == pb.RECOVER_KEEP:
            session = await _compute(node, lambda: ex.keep(head.session_id, head.positions))
            node.adopted(head.session_id, reply_to)
            return pb.RecoverReply(held=session.cache.offset, kept=session.kept)
        if head.action == pb.RECOVER_FILL:
            if head.positions > ex.max_len:
                raise invalid(f"{head.positions} positions exceed this node's context of {ex.max_len}")
            calls = [_call(ex, head)] if head.WhichOneof("payload") else []
            rows = sum(c.length for c in calls)
            async for msg in messages:  # bounded: never more rows than the header announced
                if rows > head.positions:
                    break
                calls.append(_call(ex, msg))
                rows += calls[-1].length
            if rows > head.positions:
                raise invalid(f"FILL calls carry more rows than the {head.positions} positions announced")
            return await _fill(node, ex, head, calls, reply_to)
        if head.action == pb.RECOVER_FEED_NEXT:
            return await _feed_next(node, ex, head, shard.next_hop)
    except (SessionError, StepError) as e:
        raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"node {node.name}: {e}") from None
    except OverflowError as e:
        raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"node {node.name}: {e}") from None
    raise invalid(f"unknown Recover action {head.action}")


async def _compute(node: RingNode, work: Callable):
    """`work()` in the node's compute thread (after the batch running now: the executor is touched by one
    job at a time), or inline when the node computes on its event loop."""
    if node.worker is None:
        return work()
    return await asyncio.get_running_loop().run_in_executor(node.worker, work)


def _call(ex: ShardExecutor, msg: pb.RecoverMessage) -> StepRequest:
    """One call of a FILL, decoded and checked like a Forward step."""
    cfg = ex.stage.config
    which = msg.WhichOneof("payload")
    if ex.spec.is_first != (which == "tokens"):
        want = "token ids" if ex.spec.is_first else "hidden states"
        raise invalid(f"this node's stage {ex.spec} is filled with {want}, got {which or 'nothing'}")
    if which == "tokens":
        return StepRequest(
            msg.session_id or "", msg.start, tokens=tokens_from_wire(msg.tokens, cfg.vocab_size)
        )
    return StepRequest(msg.session_id or "", msg.start, hidden=tensor_from_wire(msg.hidden, cfg.hidden_size))


async def _fill(
    node: RingNode, ex: ShardExecutor, head: pb.RecoverMessage, calls: list[StepRequest], reply_to: str | None
) -> pb.RecoverReply:
    """Open the session afresh and compute this stage over `calls`, which must cover [0, positions) in order."""
    at = 0
    for call in calls:
        call.session_id = head.session_id
        if call.start != at:
            raise invalid(
                f"FILL calls must cover the positions in order: one starts at {call.start}, not {at}"
            )
        at += call.length
    if at != head.positions:
        raise invalid(f"FILL calls cover {at} positions, the header says {head.positions}")
    sampling = sampling_from_wire(head.open.sampling)
    t = [0.0]

    def work() -> int:
        t0 = time.perf_counter()
        ex.open_session(head.session_id, sampling, replace=True, max_len=head.open.max_len or None)
        try:
            rows = ex.fill(head.session_id, calls)
        except BaseException:
            ex.close_session(head.session_id)  # half a cache is worth nothing: the coordinator replays
            raise
        t[0] = time.perf_counter() - t0
        return rows

    rows = await _compute(node, work)
    node.adopted(head.session_id, reply_to)
    session = ex.sessions[head.session_id]
    return pb.RecoverReply(held=session.cache.offset, kept=session.kept, rows=rows, compute_ms=t[0] * 1e3)


async def _feed_next(
    node: RingNode, ex: ShardExecutor, head: pb.RecoverMessage, next_hop: str
) -> pb.RecoverReply:
    """FILL the next hop from this node's kept boundary rows, in the calls `head.starts`."""
    from edgeshard.node.service.ring import LAST

    if next_hop == LAST:
        raise invalid("the last node has no next hop to feed")
    end = head.positions
    starts = list(head.starts)
    if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= end:
        raise invalid(f"FEED_NEXT needs increasing call starts from 0 below {end}, got {starts[:8]}...")
    rows = await _compute(node, lambda: ex.sent_rows(head.session_id, end).clone())
    node.adopted(head.session_id)

    def stream():
        first = pb.RecoverMessage(
            plan_id=head.plan_id,
            session_id=head.session_id,
            action=pb.RECOVER_FILL,
            positions=end,
            open=head.open,
        )
        for i, (a, b) in enumerate(zip(starts, [*starts[1:], end])):
            msg = first if i == 0 else pb.RecoverMessage()
            msg.start = a
            tensor_to_wire(rows[a:b], msg.hidden)
            yield msg

    async with channel(next_hop) as ch:  # the process's security mode, as the ring's NextHop
        try:
            return await pb_grpc.NodeStub(ch).Recover(stream(), timeout=FEED_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise WireError(e.code(), f"feeding the next node {next_hop}: {e.details()}") from None
