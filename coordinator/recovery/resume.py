"""Resume a session on a new plan at the cost of the lost stages' share of its context (issue #21).

The full replay (resilient.py `_replay`) feeds the whole history through every stage again: with a
1500-token context that is a whole prefill. But only the stages that were lost need it. Each node keeps the
boundary rows it sent on (node/model/executor.py), and a node that only takes the new plan id keeps its
sessions (node/service/shard_load.py, `ShardExecutor.adopt`). So, for a session with `n` positions to restore:

1. KEEP on every stage whose node and layer range are unchanged: it still holds [0, n) (checked, not assumed).
2. Every other stage, in ring order, is FILLed call by call as the history was fed: the first stage from
   the history's tokens (sent from here), a later one by FEED_NEXT on the stage before it, which streams the
   boundary rows it kept (or just computed, when it was filled too) straight to it.
3. The session is then open on the new plan; the failed call is retried as usual and gives the next token.

Anything refused (a node restarted and lost its sessions, rows not kept, memory full, a node failing) gives
`None` and the caller falls back to the full replay, which opens the session afresh on every node: never a
different token, only a slower recovery. When no stage kept the session (a re-split that moved every
boundary), the full replay is used directly: it pipelines the stages, a chain of FILLs would not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from edgeshard.coordinator.recovery.log import SessionHistory
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import sampling_to_wire

KEEP_TIMEOUT_S = 10.0  # a KEEP is a check: it waits only for the batch a node is computing
FILL_S_PER_ROW = 0.05  # a FILL's deadline: this per row of the context (slow boards, long contexts) ...
FILL_MIN_S = 30.0  # ... and at least this


@dataclass
class Resumed:
    """How a session was resumed: which stages kept it, which were filled, and the rows computed."""

    kept: list[int]  # stage indexes that kept their caches
    filled: list[int]  # stage indexes computed again (their layers over the context)
    rows: int  # rows computed in all (positions x filled stages)
    ms: float
    compute_ms: float = 0.0  # of which the filled nodes computed (the rest: checks, transfers, the network)


def stage_key(stage: dict) -> tuple:
    """What must be unchanged for a node to keep a stage's caches across plans: node and layer range."""
    return stage["address"], stage["start_layer"], stage["end_layer"]


async def resume(
    session: SessionHistory,
    old_plan: Sequence[dict],
    new_plan: Sequence[dict],
    clients,
    plan_id: int,
    reply_to: str,
) -> Resumed | None:
    """Resume `session` on the new plan (`clients` in ring order, `new_plan` their stages) from the caches the
    nodes kept; None when it cannot (the caller replays). See the module docstring."""
    t0 = time.perf_counter()
    n = len(session.replay_tokens())
    calls = session.replay_calls()
    if n == 0 or not calls:
        return None
    old = {stage_key(s) for s in old_plan}
    could_keep = [i for i, s in enumerate(new_plan) if stage_key(s) in old]
    if not could_keep:
        return None
    open_msg = pb.OpenSession(
        sampling=sampling_to_wire(session.sampling), reply_to=reply_to, max_len=session.max_len
    )

    def head(action: int) -> pb.RecoverMessage:
        return pb.RecoverMessage(
            plan_id=plan_id, session_id=session.session_id, action=action, positions=n, open=open_msg
        )

    async def keep(i: int) -> bool:
        try:
            reply = await _recover(clients[i], [head(pb.RECOVER_KEEP)], KEEP_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.held == n

    kept_ok = await asyncio.gather(*(keep(i) for i in could_keep))
    kept = [i for i, ok in zip(could_keep, kept_ok) if ok]
    if not kept:
        return None
    filled, rows, compute_ms = [], 0, 0.0
    timeout = max(FILL_MIN_S, n * FILL_S_PER_ROW)
    try:
        for i in range(len(new_plan)):
            if i in kept:
                continue
            if i == 0:
                msgs = [head(pb.RECOVER_FILL)]
                for j, (start, tokens) in enumerate(calls):
                    msg = msgs[0] if j == 0 else pb.RecoverMessage()
                    msg.start = start
                    msg.tokens.ids.extend(tokens)
                    if j:
                        msgs.append(msg)
                reply = await _recover(clients[0], msgs, timeout)
            else:  # the stage before kept the rows it sent (or just computed them): it feeds this one
                msg = head(pb.RECOVER_FEED_NEXT)
                msg.starts.extend(start for start, _ in calls)
                reply = await _recover(clients[i - 1], [msg], timeout)
            if reply.held != n:
                return None
            filled.append(i)
            rows += reply.rows
            compute_ms += reply.compute_ms
    except grpc.aio.AioRpcError:
        return None
    return Resumed(kept, filled, rows, (time.perf_counter() - t0) * 1e3, compute_ms)


async def _recover(client, messages: list[pb.RecoverMessage], timeout: float) -> pb.RecoverReply:
    """One Recover call on the node of `client` (a GrpcStageClient: its stub and metadata)."""
    return await client.stub.Recover(iter(messages), timeout=timeout, metadata=client.metadata)
