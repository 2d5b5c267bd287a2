"""A node outside the plan is balanced in between requests when the cost model predicts a faster ring.

Three real nodes; the ring runs on two (f32, layers 0-14 and 15-29: what a re-split after a failure leaves)
and the third is live outside it, as a node that came back. With the throughput objective the bottleneck
drops from 15 layers to 10, so `rebalance()` moves to three stages; with an open session it does nothing
(never mid-sequence). f32: moving layer boundaries is bit-exact, so the answers stay the same.
"""

from __future__ import annotations

import asyncio

import pytest

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.recovery.resilient import RecoveryPolicy, resilient
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.config import even_split
from edgeshard.node.model.sampling import SamplingParams

pytestmark = pytest.mark.slow
PROMPT = [1, 504, 3458, 314, 4649, 314, 253, 1345]


def test_a_returning_node_is_balanced_in_between_requests(smollm2_path):
    with LocalNodes(3, model_dir=smollm2_path.parent, name="bal", node_args=["--no-benchmark"]) as nodes:

        async def run():
            d = await deploy(nodes.addresses[:2], smollm2_path.name, 30, "f32", specs=even_split(30, 2))
            policy = RecoveryPolicy(rebalance_s=0)  # called by hand below
            pipe = resilient(d, await d.pipeline(), smollm2_path, candidates=nodes.addresses, policy=policy)
            pipe.replanner.objective = "throughput"

            async def answer() -> list[int]:
                return [t async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), 12))]

            try:
                before = await answer()
                await pipe.open("in-flight", SamplingParams())
                assert await pipe.rebalance() is None  # a session is open: not now
                await pipe.close("in-flight")
                event = await pipe.rebalance()
                after = await answer()
                return before, after, event, pipe.deployment.plan
            finally:
                await pipe.aclose()
                await d.close()

        before, after, event, plan = asyncio.run(run())
    assert event is not None and event.outcome == "recovered", event
    assert event.action.startswith("balanced in 1 node(s)"), event.action
    assert [p["address"] for p in plan] == nodes.addresses
    assert [(p["start_layer"], p["end_layer"]) for p in plan] == [(0, 10), (10, 20), (20, 30)]
    assert after == before
