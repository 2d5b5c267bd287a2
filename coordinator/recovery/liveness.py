"""Is a node alive, and does it still serve our plan? The short Health probes that failure recovery relies on.

A probe opens a fresh channel and asks Health with a short timeout. Fresh on purpose: a channel that saw its
node die sits in gRPC's reconnect back-off and keeps failing for seconds after the node is back, and a node
that restarted at the same address must count as live at once. The verdicts:

    up       answered, and holds a shard of the plan we expect
    stale    answered, but holds no shard or another plan's: it restarted (fresh state) or was reloaded
    down     refused or unreachable: the process is gone (or the network is)
    silent   no answer within the timeout: hung (SIGSTOP, swapping, overheating) or very busy

A node computes on its event loop between messages, so one in the middle of a long step answers late;
`diagnose` therefore calls a node hung only after `hang_s` of silence, while down and stale are verdicts at
once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from edgeshard.node.security.channels import Security, connection_problem
from edgeshard.node.security.channels import channel as secure_channel
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.options import GRPC_OPTIONS

PROBE_TIMEOUT_S = 1.0
HANG_S = 3.0
UP, STALE, DOWN, SILENT = "up", "stale", "down", "silent"


@dataclass(frozen=True)
class Probe:
    """What one Health call found out about one node."""

    address: str
    state: str  # up, stale, down or silent (see the module docstring)
    plan_id: int = 0  # the plan the node serves (0: none)
    detail: str = ""  # why it is not up, for the log
    at: float = 0.0  # wall-clock time of the answer (or of giving up)

    @property
    def answers(self) -> bool:
        """The process runs and answers (up or stale): it may be planned with."""
        return self.state in (UP, STALE)


class NodeFailure(Exception):
    """Nodes of the running plan failed (or its streams broke): the ring must be rebuilt before going on.

    `t0` (perf_counter) and `detected_at` (wall clock) are when the failure first showed, an error or a
    missed deadline; `probe_ms` is how long it took to tell which nodes failed.
    """

    def __init__(self, cause: str, nodes: Sequence[str] = (), t0: float | None = None, probe_ms: float = 0.0):
        super().__init__(cause)
        self.cause = cause
        self.nodes = list(nodes)
        self.t0 = time.perf_counter() if t0 is None else t0
        self.detected_at = time.time() - (time.perf_counter() - self.t0)
        self.probe_ms = probe_ms


async def probe(
    address: str,
    plan_id: int | None = None,
    timeout: float = PROBE_TIMEOUT_S,
    security: Security | None = None,
) -> Probe:
    """Health of the node at `address`; `plan_id` None accepts any state of a node that answers."""
    try:
        async with secure_channel(address, security, GRPC_OPTIONS) as channel:
            reply = await pb_grpc.NodeStub(channel).Health(pb.HealthRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Probe(address, SILENT, detail=f"no Health answer within {timeout:g} s", at=time.time())
        return Probe(address, DOWN, detail=reason(e.details(), e.code()), at=time.time())
    if plan_id is not None and (not reply.loaded or reply.plan_id != plan_id):
        held = f"plan {reply.plan_id}" if reply.loaded else "no shard"
        return Probe(address, STALE, reply.plan_id, f"restarted or reloaded: holds {held}", time.time())
    return Probe(address, UP, reply.plan_id, at=time.time())


async def probe_all(
    addresses: Sequence[str], plan_id: int | None = None, timeout: float = PROBE_TIMEOUT_S
) -> list[Probe]:
    """`probe` every address at once, in the given order."""
    return list(await asyncio.gather(*(probe(a, plan_id, timeout) for a in addresses)))


async def diagnose(
    addresses: Sequence[str],
    plan_id: int | None,
    timeout: float = PROBE_TIMEOUT_S,
    hang_s: float = HANG_S,
) -> tuple[list[Probe], list[Probe]]:
    """Probe the nodes of plan `plan_id` until there is a verdict: (the failed ones, the last probes).
    With `plan_id` None any node that answers is fine (it may be loading).

    Down and stale nodes are failures at once. Silent ones only after `hang_s` of silence (0: a single
    round): until then they may just be busy with a long step. No failure: every node is up.
    """
    start = time.monotonic()
    while True:
        probes = await probe_all(addresses, plan_id, timeout)
        failed = [p for p in probes if p.state in (DOWN, STALE)]
        silent = [p for p in probes if p.state == SILENT]
        if failed or not silent:
            return failed, probes
        if time.monotonic() - start >= hang_s:
            return silent, probes


_PLAIN = (
    "Connection refused",
    "Connection reset",
    "Socket closed",
    "No route to host",
    "Network is unreachable",
)


def reason(details: str | None, code: grpc.StatusCode | None = None) -> str:
    """A gRPC failure in a few words ("connection refused"), for log lines a user reads."""
    problem = connection_problem(details)
    if problem is not None:
        return problem
    for plain in _PLAIN:
        if plain.lower() in (details or "").lower():
            return plain.lower()
    return (details or (code.name if code else "")).splitlines()[0][:160] if details or code else "?"
