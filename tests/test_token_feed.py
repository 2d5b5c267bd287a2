"""The direct token feed over real node processes: the last node sends each sampled token straight to the first
node (docs/pipeline.md). The coordinator's output must be exactly what it is without the feed, stop where the
generation loop stops (stop ids, max_tokens), and a cancelled generation must end the session everywhere."""

from __future__ import annotations

import asyncio
import time

import pytest

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.pipeline.remote import RemotePipeline
from edgeshard.node.model.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3717, 7018, 2, 198, 1, 4093, 198]
GREEDY = SamplingParams()
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=11)


async def _run(pipe, max_tokens: int, stop_ids=frozenset(), sampling=GREEDY) -> Sequence:
    seq = Sequence(PROMPT, sampling, max_tokens, stop_ids=frozenset(stop_ids))
    async for _ in generate(pipe, seq):
        pass
    return seq


async def _stats(d):
    return [i.stats for i in await asyncio.gather(*(c.info() for c in d.clients))]


async def _wait_no_sessions(d, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        stats = await _stats(d)
        if all(s.sessions == 0 for s in stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


def test_fed_tokens_equal_unfed_and_stop_where_the_loop_stops(node_cluster, smollm2_path):
    async def run():
        d = await deploy(node_cluster.addresses, smollm2_path.name, 30, None)
        fed = await d.pipeline()
        unfed = RemotePipeline(d.clients, d.plan_id, feed=False)
        await unfed.start()
        one_by_one = RemotePipeline(d.clients, d.plan_id, feed_results_every=1)  # no results held back
        await one_by_one.start()
        try:
            out = {"one_by_one": await _run(one_by_one, 24)}
            for name, sampling in (("greedy", GREEDY), ("seeded", SEEDED)):
                before = await _stats(d)
                ref = await _run(unfed, 24, sampling=sampling)
                mid = await _stats(d)
                got = await _run(fed, 24, sampling=sampling)
                after = await _wait_no_sessions(d)
                out[name] = (ref, got, before, mid, after)
            # a stop id that the answer reaches: both stop on it (not yielded) at the same place
            ref = out["greedy"][0]
            stop = ref.generated[9]
            first = ref.generated.index(stop)
            before = await _stats(d)
            stopped_ref = await _run(unfed, 24, {stop})
            stopped = await _run(fed, 24, {stop})
            after = await _wait_no_sessions(d)
            out["stop"] = (stopped_ref, stopped, before, before, after)
            out["first"] = first
            return out
        finally:
            await fed.aclose()
            await unfed.aclose()
            await one_by_one.aclose()
            await d.close()

    out = asyncio.run(run())
    for name in ("greedy", "seeded"):
        ref, got, before, mid, after = out[name]
        assert got.generated == ref.generated, name
        assert len(got.generated) == 24 and got.finish_reason == ref.finish_reason == "length"
        assert mid[-1].fed == before[-1].fed, "the unfed pipeline must not ask for the feed"
        assert after[-1].fed - mid[-1].fed == 23, "every decode step after the first token is fed"
        assert all(s.sessions == 0 for s in after)
        assert [s.errors for s in after] == [s.errors for s in before]
    assert out["one_by_one"].generated == out["greedy"][0].generated
    ref, got, before, _, after = out["stop"]
    assert got.generated == ref.generated == out["greedy"][0].generated[: out["first"]]
    assert got.finish_reason == ref.finish_reason == "stop"
    # fed: the steps that made tokens 2..k (the stop token is the k-th); never one past the stop
    assert after[-1].fed - before[-1].fed == len(got.generated)
    assert [s.errors for s in after] == [s.errors for s in before]


def test_cancelled_fed_generation_ends_everywhere(node_cluster, smollm2_path):
    async def run():
        d = await deploy(node_cluster.addresses, smollm2_path.name, 30, None)
        pipe = await d.pipeline()
        try:
            before = await _stats(d)
            ref = await _run(pipe, 16)
            seq = Sequence(PROMPT, GREEDY, 200)
            gen = generate(pipe, seq)
            got = [await anext(gen) for _ in range(5)]
            await gen.aclose()  # the consumer goes away (a client disconnect): close() ends the session
            after = await _wait_no_sessions(d)
            fed_then = after[-1].fed
            await asyncio.sleep(0.3)
            later = await _stats(d)
            again = await _run(pipe, 16)  # the pipeline still serves, exactly
            return ref, got, again, before, after, fed_then, later
        finally:
            await pipe.aclose()
            await d.close()

    ref, got, again, before, after, fed_then, later = asyncio.run(run())
    assert got == ref.generated[:5]
    assert again.generated == ref.generated
    assert all(s.sessions == 0 for s in after), "the cancelled session still holds a cache somewhere"
    assert later[-1].fed == fed_then, "the ring kept feeding a cancelled session"
    assert fed_then - before[-1].fed < 15 + 20, "the cancelled session was fed far past its cancel"
    assert [s.errors for s in later] == [s.errors for s in before], "a dropped fed step counted as an error"
