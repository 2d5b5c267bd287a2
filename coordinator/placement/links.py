"""How fast the coordinator reaches a node: round trip and bandwidth, measured with gRPC Health calls.

A handful of empty Health calls give the round trip (median, so one slow call does not count); one call that
asks for a 256 KiB reply gives the bandwidth (its extra time over an empty call). Nodes older than the
link test send no payload; their bandwidth is then assumed (`DEFAULT_MBPS`, a 100 Mbit/s LAN).

The planner needs node-to-node links too, which the coordinator cannot see. It assumes a LAN switch (star):
every hop costs the two ends' share of their round trips to the coordinator (see coordinator/placement/planner.py).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edgeshard.node.security.channels import channel as secure_channel
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.options import GRPC_OPTIONS

DEFAULT_MBPS = 12.5  # MB/s of a 100 Mbit/s LAN: what a board without the link test is assumed to have
PROBE_BYTES = 256 << 10
RTT_SAMPLES = 7


@dataclass(frozen=True)
class Link:
    """The coordinator's link to one node."""

    rtt_ms: float  # median round trip of an empty gRPC call (includes both ends' gRPC software)
    mbps: float  # MB/s of payload (DEFAULT_MBPS when not measured)
    measured_bandwidth: bool = True

    def transfer_ms(self, nbytes: int) -> float:
        """Milliseconds to move `nbytes` over this link (bandwidth only, no latency)."""
        return nbytes / (self.mbps * 1e3)


async def measure_link(
    address: str, samples: int = RTT_SAMPLES, probe_bytes: int = PROBE_BYTES, timeout: float = 5.0
) -> Link:
    """Measure the link to the node at `address` (about `samples` round trips plus one bulk reply)."""
    async with secure_channel(address, None, GRPC_OPTIONS) as channel:  # the cluster's TLS, as the ring
        stub = pb_grpc.NodeStub(channel)
        await stub.Health(pb.HealthRequest(), timeout=timeout)  # connect outside the timing
        rtts = []
        for _ in range(samples):
            t0 = time.perf_counter()
            await stub.Health(pb.HealthRequest(), timeout=timeout)
            rtts.append((time.perf_counter() - t0) * 1e3)
        rtt = statistics.median(rtts)
        t0 = time.perf_counter()
        reply = await stub.Health(pb.HealthRequest(reply_bytes=probe_bytes), timeout=timeout)
        bulk_ms = (time.perf_counter() - t0) * 1e3
    if len(reply.payload) < probe_bytes // 2:
        return Link(round(rtt, 3), DEFAULT_MBPS, measured_bandwidth=False)
    extra_ms = max(bulk_ms - rtt, 1e-3)
    return Link(round(rtt, 3), round(len(reply.payload) / (extra_ms * 1e3), 2))


async def measure_links(addresses: Sequence[str]) -> dict[str, Link]:
    """Links to several nodes, one after the other (measuring them at once would share the coordinator's
    own link and CPU, and every figure would come out slower than it is)."""
    links = {}
    for address in addresses:
        links[address] = await measure_link(address)
    return links


def gather_links(addresses: Sequence[str]) -> dict[str, Link]:
    """`measure_links` for synchronous callers."""
    return asyncio.run(measure_links(addresses))
