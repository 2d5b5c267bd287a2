"""The deadline every call on the ring runs under, and the verdict when a call fails.

`Watchdog.guard(call, rows, given_up)` awaits one call of a `RemotePipeline`:

- what the call returns, it returns;
- an error a node gave about the request itself (bad input, KV memory full: `about_the_request`) is raised
  as is: another ring would refuse it alike;
- any other error (a broken stream, UNAVAILABLE, a node that restarted) is a `NodeFailure` naming the nodes
  that one round of probes finds down, stale or silent (coordinator/recovery/liveness.py);
- no result within the deadline (`RecoveryPolicy.deadline(rows)`): the nodes are probed. Down or stale ones
  are a failure at once, silent ones after `hang_s` (a node busy with a long step answers Health late); while
  every node answers it waits on, up to `max_step_s` (then the step was lost);
- `given_up` set meanwhile (another call failed and the plan is being rebuilt): NodeFailure("superseded").

`watch(call, addresses)` awaits a load the same way: a node that dies or hangs meanwhile fails it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from edgeshard.coordinator.errors import ClusterError
from edgeshard.coordinator.recovery.liveness import NodeFailure, Probe, diagnose

if TYPE_CHECKING:
    from edgeshard.coordinator.recovery.log import RecoveryPolicy

log = logging.getLogger("edgeshard.coordinator")

# node errors about the request itself (a retry elsewhere would fail alike); anything else rebuilds the ring
_REQUEST_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
_EPOCH_SIGNS = ("stale plan id", "unknown session")  # a node of our plan was restarted or reloaded


def about_the_request(e: ClusterError) -> bool:
    """A node refused the request itself (a RemoteStepError with such a code), not because of the ring."""
    code = getattr(e, "grpc_code", None)
    return code in _REQUEST_CODES and not any(sign in str(e) for sign in _EPOCH_SIGNS)


class Watchdog:
    """Guards calls on the ring of `ring()` (node names by address, and the plan id) under `policy`."""

    def __init__(self, policy: RecoveryPolicy, ring: Callable[[], tuple[dict[str, str], int]]) -> None:
        self.policy = policy
        self.ring = ring
        self.nodes: dict[str, dict] = {}  # address -> the last probe of it {state, detail, at}

    async def guard(self, call: Awaitable, rows: int, given_up: asyncio.Event) -> Any:
        """Await `call` (feeding `rows` tokens) under the deadline (see the module docstring)."""
        # the failure's clock starts when the call did: the client has waited since then (a hang costs the
        # deadline plus hang_s before anything is known, and the recovery's figures must include that)
        started = time.perf_counter()
        task = asyncio.ensure_future(call)
        stop = asyncio.ensure_future(given_up.wait())
        deadline, waited = self.policy.deadline(rows), 0.0
        try:
            while True:
                await asyncio.wait({task, stop}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    try:
                        return task.result()
                    except ClusterError as e:
                        if about_the_request(e):
                            raise
                        raise await self.judge(str(e), started) from e
                if stop.done():
                    raise NodeFailure("superseded: the plan was given up")
                waited += deadline
                failure = await self.diagnose(f"no result within {waited:g} s", started, self.policy.hang_s)
                if failure is not None:
                    raise failure
                if waited >= self.policy.max_step_s:
                    raise NodeFailure(f"no result within {waited:g} s although every node answers: lost")
        finally:
            task.cancel()
            stop.cancel()

    async def watch(self, call: Awaitable, addresses: Sequence[str]) -> Any:
        """Await `call` (a load) while probing `addresses`: ClusterError as soon as one dies or hangs (a hung
        node would hold its LoadShard stream open forever)."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                await asyncio.wait({task}, timeout=self.policy.step_deadline_s)
                if task.done():
                    return task.result()
                failed, probes = await diagnose(
                    addresses, None, self.policy.probe_timeout_s, self.policy.hang_s
                )
                self.note(probes)
                if failed:
                    raise ClusterError(
                        "while loading: " + "; ".join(f"{p.address} {p.state}: {p.detail}" for p in failed)
                    )
        finally:
            task.cancel()

    async def judge(self, error: str, t0: float | None = None) -> NodeFailure:
        """The failure behind an error (of a call started at `t0`): the nodes one round of probes finds
        failed (the error was their symptom: it goes to the log at info), else the ring itself."""
        log.info("ring error: %s", error)
        t0 = time.perf_counter() if t0 is None else t0
        return await self.diagnose("", t0, 0.0) or NodeFailure(
            f"{error}; every node answers: rebuilding the ring", t0=t0
        )

    async def diagnose(self, cause: str, t0: float, hang_s: float) -> NodeFailure | None:
        """Probe the ring's nodes until a verdict (liveness.diagnose): a NodeFailure, or None (all up)."""
        names, plan_id = self.ring()
        failed, probes = await diagnose(list(names), plan_id, self.policy.probe_timeout_s, hang_s)
        self.note(probes)
        if not failed:
            return None
        nodes = [f"{names[p.address]} ({p.address})" for p in failed]
        found = "; ".join(f"{names[p.address]} {p.state}: {p.detail}" for p in failed)
        probe_ms = (time.perf_counter() - t0) * 1e3
        return NodeFailure(f"{cause}; {found}" if cause else found, nodes, t0, probe_ms)

    def note(self, probes: Sequence[Probe]) -> None:
        """Remember what probes found (`/v1/cluster` shows it)."""
        for p in probes:
            self.nodes[p.address] = {"state": p.state, "detail": p.detail, "at": round(p.at, 3)}
