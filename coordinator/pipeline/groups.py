"""Decode steps in groups: the running sequences circulate the ring as one group per node.

With S sequences on an N-node ring, throughput is best when the sequences travel as N groups of S/N: every
node computes one group at a time (pipeline parallelism) and each group is one batched forward (continuous
batching, node/service/batching.py). Left to themselves, sequences drift: they start at different times (their
prompts are prefilled one chunk per batch) and pass the nodes one or two at a time, paying a forward's fixed
cost for each. `StepGroups` puts each sequence in the smallest of N groups when it starts decoding, and sends
a group's decode steps as one burst once every member has its next step ready: members come back from the
last node together, so the barrier costs microseconds, and a newcomer waits at most one round to fall into
step. The nodes keep the groups apart (at most S/N sequences per forward, `node.batching.group_size`).

A member that neither sends its next step nor leaves (its consumer is slow, or it was abandoned without a
close) holds its group back for `linger_s` at most: the others go without it, and it is taken out of the
group until it sends again (then it joins the smallest group, as a newcomer does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeshard.node.wire import edgeshard_pb2 as pb

LINGER_S = 0.01  # longest a ready group waits for a member that came back but has not sent its next step


@dataclass
class _Group:
    members: set[str] = field(default_factory=set)
    inflight: set[str] = field(default_factory=set)  # sent, result not back yet
    ready: dict[str, pb.ForwardMessage] = field(default_factory=dict)  # next step waiting for the burst
    timer: asyncio.TimerHandle | None = None


class StepGroups:
    """Sends the decode steps of sessions in `n` groups, each group's as one burst (see the module docstring)."""

    def __init__(self, n: int, send: Callable[[pb.ForwardMessage], None], linger_s: float = LINGER_S) -> None:
        self.groups = [_Group() for _ in range(max(1, n))]
        self.send = send  # queues a message for the first node (never blocks)
        self.linger_s = linger_s
        self.group_of: dict[str, _Group] = {}

    def submit(self, session_id: str, msg: pb.ForwardMessage) -> None:
        """Queue a decode step of `session_id`; it goes out with its group's next burst."""
        group = self.group_of.get(session_id)
        if group is None:  # starts decoding: the smallest group takes it
            group = min(self.groups, key=lambda g: len(g.members))
            group.members.add(session_id)
            self.group_of[session_id] = group
        group.inflight.discard(session_id)
        group.ready[session_id] = msg
        self._maybe_send(group)

    def returned(self, session_id: str) -> None:
        """The result of `session_id`'s step is back: it is no longer in flight."""
        group = self.group_of.get(session_id)
        if group is not None and session_id in group.inflight:
            group.inflight.discard(session_id)
            self._maybe_send(group)

    def leave(self, session_id: str) -> None:
        """`session_id` ended: forget it (a step it had waiting is dropped)."""
        group = self.group_of.pop(session_id, None)
        if group is not None:
            group.members.discard(session_id)
            group.inflight.discard(session_id)
            group.ready.pop(session_id, None)
            self._maybe_send(group)

    def _maybe_send(self, group: _Group) -> None:
        if not group.ready or group.inflight:  # nothing to send, or members still on their way back
            return
        if len(group.ready) == len(group.members):  # everyone is ready: now
            self._flush(group)
        elif group.timer is None:  # some came back but have not sent yet: a moment, not more
            group.timer = asyncio.get_running_loop().call_later(self.linger_s, self._linger_over, group)

    def _linger_over(self, group: _Group) -> None:
        group.timer = None
        for session_id in group.members - group.ready.keys() - group.inflight:  # stragglers: out for now
            group.members.discard(session_id)
            del self.group_of[session_id]
        self._flush(group)

    def _flush(self, group: _Group) -> None:
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        for i, (session_id, msg) in enumerate(group.ready.items()):
            group.inflight.add(session_id)
            msg.burst_left = len(group.ready) - 1 - i  # node 1 waits for the whole burst (see the proto)
            self.send(msg)
        group.ready.clear()

    def sizes(self) -> list[int]:
        """Members per group (for stats and tests)."""
        return [len(g.members) for g in self.groups]
