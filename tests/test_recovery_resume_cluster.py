"""Recovery at the cost of one stage's share of the context, over real node processes (issue #21).

Four `edgeshard node` processes, f32: a ring of three stages (layers 0-9, 10-19, 20-29) and a spare that
already holds the lost stage's layers. The node of the first, a middle or the last stage is SIGKILLed during
decode of a ~300-token prompt; the output must equal the uninterrupted run's, the two survivors must not
compute their layers over the context again (their NodeStats: no refilled rows, and since the new plan only
the decode steps that followed), and the replacement must have computed its own layers exactly once over the
positions before the failed call (`recovered_rows`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.pipeline.stage_client import connect
from edgeshard.coordinator.recovery.resilient import RecoveryPolicy, resilient
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.config import even_split
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.wire import edgeshard_pb2 as pb

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

MAX_TOKENS = 16
KILL_AFTER = 5  # tokens made before the kill: the step feeding token 5 meets the dead node
QUANT = "f32"  # bit-identical across any split; a replacement keeps the boundaries anyway
TEXT = "The history of the bicycle begins in the early nineteenth century, when inventors in Europe " * 18


@pytest.fixture(scope="module")
def aio():
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(scope="module")
def cluster(smollm2_path):
    """Restarts during a run go through one long-lived thread: a node gets SIGTERM when the thread that started
    it ends (the parent-death signal, coordinator/sdk/local_nodes.py)."""
    with LocalNodes(4, model_dir=smollm2_path.parent, name="resume", node_args=["--no-benchmark"]) as c:
        c.restarter = ThreadPoolExecutor(1, thread_name_prefix="restarter")
        try:
            yield c
        finally:
            c.stop()
            c.restarter.shutdown()


@pytest.fixture(scope="module")
def prompt(smollm2_path):
    from edgeshard.node.weights.tokenizer import Tokenizer

    ids = Tokenizer.from_checkpoint(smollm2_path).encode(TEXT)
    assert len(ids) > 250
    return ids


@contextlib.asynccontextmanager
async def ring(cluster, path):
    """The three-stage ring on the nodes holding those stages (no reload), every node a candidate."""
    for i, proc in enumerate(cluster.procs):
        if proc.poll() is not None:
            await asyncio.get_running_loop().run_in_executor(cluster.restarter, cluster.restart, i)
    clients, infos = await connect(cluster.addresses)
    await asyncio.gather(*(c.close() for c in clients))
    specs, chosen = even_split(30, 3), []
    for spec in specs:
        holders = [
            c.address
            for c, i in zip(clients, infos)
            if i.loaded and (i.shard.start_layer, i.shard.end_layer) == (spec.start_layer, spec.end_layer)
        ]
        free = [a for a in cluster.addresses if a not in chosen and a not in holders]
        chosen.append(next((a for a in holders if a not in chosen), None) or free[0])
    d = await deploy(chosen, path.name, 30, QUANT, specs=specs)
    pipe = resilient(d, await d.pipeline(), path, candidates=cluster.addresses, policy=RecoveryPolicy())
    try:
        yield pipe
    finally:
        await pipe.aclose()
        await d.close()


async def preload_spare(pipe, cluster, stage: int) -> str:
    """Load `stage`'s layers on the node outside the plan (a plan id of its own): a hot spare."""
    spare = next(a for a in cluster.addresses if a not in {s["address"] for s in pipe.deployment.plan})
    await pipe.deployment.preload_spare(spare, stage)
    return spare


async def tokens(pipe, prompt, on_token=None) -> list[int]:
    out = []
    async for t in generate(pipe, Sequence(prompt, SamplingParams(), MAX_TOKENS)):
        out.append(t)
        if on_token is not None:
            await on_token(len(out))
    return out


async def stats(addresses) -> dict[str, pb.NodeStats]:
    clients, infos = await connect(list(addresses))
    await asyncio.gather(*(c.close() for c in clients))
    return {c.address: i.stats for c, i in zip(clients, infos)}


@pytest.fixture(scope="module")
def reference(aio, cluster, smollm2_path, prompt):
    async def run():
        async with ring(cluster, smollm2_path) as pipe:
            return await tokens(pipe, prompt)

    return aio(run())


@pytest.mark.parametrize("stage", [1, 0, 2], ids=["middle", "first", "last"])
def test_a_lost_stage_is_refilled_and_the_survivors_keep_their_caches(
    aio, cluster, smollm2_path, prompt, reference, stage
):
    positions = len(prompt) + KILL_AFTER - 1  # fed before the call that meets the dead node

    async def run():
        async with ring(cluster, smollm2_path) as pipe:
            spare = await preload_spare(pipe, cluster, stage)
            victim = cluster.addresses.index(pipe.deployment.plan[stage]["address"])
            survivors = [s["address"] for i, s in enumerate(pipe.deployment.plan) if i != stage]
            killed, latency = [0.0], [0.0]
            before = await stats(survivors)  # counters of what the nodes did for earlier tests

            async def on_token(n: int) -> None:
                if n == KILL_AFTER:
                    cluster.procs[victim].kill()
                    cluster.procs[victim].wait()
                    killed[0] = time.perf_counter()
                elif n == KILL_AFTER + 1:
                    latency[0] = time.perf_counter() - killed[0]

            got = await tokens(pipe, prompt, on_token)
            after = await stats([*survivors, spare])
            plan = [s["address"] for s in pipe.deployment.plan]
            return pipe.events[-1], plan, got, before, after, latency[0]

    event, plan, got, before, after, latency = aio(run())
    print(f"stage {stage}: kill to next token {latency * 1e3:.0f} ms; {event.summary()}")
    assert got == reference, "the output changed"
    assert event.outcome == "recovered" and event.action.startswith("replaced"), event
    assert event.resumed == 1 and event.replayed_tokens == 0, event
    assert event.kept_stages == [i for i in range(3) if i != stage]
    assert event.refilled_rows == positions  # the lost stage's layers, once over the context
    spare = plan[stage]
    assert after[spare].recovered_rows == positions  # a fresh node: its counter starts at the recovery
    for address in plan:
        if address != spare:  # survivors: nothing refilled, and since the new plan only the decode steps
            assert after[address].recovered_rows == before[address].recovered_rows
            assert after[address].rows <= MAX_TOKENS - KILL_AFTER + 1 < len(prompt)


def test_a_survivor_that_restarted_empty_is_filled_in_a_chain(aio, cluster, smollm2_path, prompt, reference):
    """The middle node dies and the last one restarts at its address in the same moment (it comes back with no
    shard and no sessions): its KEEP is refused, so it is filled too, from the rows the replacement of the
    middle stage has just computed and kept. Only the first stage keeps its cache; the tokens do not change."""
    positions = len(prompt) + KILL_AFTER - 1

    async def run():
        async with ring(cluster, smollm2_path) as pipe:
            spare = await preload_spare(pipe, cluster, 1)
            middle = cluster.addresses.index(pipe.deployment.plan[1]["address"])
            last = cluster.addresses.index(pipe.deployment.plan[2]["address"])

            async def on_token(n: int) -> None:
                if n == KILL_AFTER:
                    for victim in (middle, last):
                        cluster.procs[victim].kill()
                        cluster.procs[victim].wait()
                    await asyncio.get_running_loop().run_in_executor(cluster.restarter, cluster.restart, last)

            got = await tokens(pipe, prompt, on_token)
            return pipe.events[-1], [s["address"] for s in pipe.deployment.plan], got, spare

    event, plan, got, spare = aio(run())
    print(event.summary())
    assert got == reference, "the output changed"
    assert event.outcome == "recovered" and plan[1] == spare, event
    assert event.resumed == 1 and event.kept_stages == [0] and event.refilled_rows == 2 * positions, event
