"""Failure recovery over real node processes: nodes are SIGKILLed or SIGSTOPped mid-generation, and every
generation must still complete with exactly the tokens of an uninterrupted run of the same request.

One cluster of five `edgeshard node` processes serves the whole module: a ring of three int4 stages (layers
0-9, 10-19, 20-29) and two spares. A lost stage goes to a spare with the same layer range, so the numbers are
bit-identical in int4 (tests/test_recovery_cli.py covers survivors re-splitting the layers, in f32). Killed
nodes are restarted at their address between scenarios and become the spares. Every node runs with
--memory-limit 75M: a 10-layer stage fits, a 15-layer one does not, so two nodes cannot hold the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from edgeshard.coordinator.errors import CapacityError, ServerUnavailableError
from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.pipeline.remote import RemotePipeline, RemoteStepError
from edgeshard.coordinator.pipeline.stage_client import connect
from edgeshard.coordinator.recovery.resilient import RecoveryPolicy, resilient
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.coordinator.serving.assemble import resilient_info
from edgeshard.coordinator.serving.engine import Engine, GenerationRequest
from edgeshard.node.model.config import even_split
from edgeshard.node.model.sampling import SamplingParams

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

MAX_TOKENS = 64
LIMIT = "75M"
POLICY = RecoveryPolicy(retry_s=1.0)  # the default deadlines; retry quickly while the model does not fit
GREEDY = SamplingParams()
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
TEXT = "The history of the bicycle begins in the early nineteenth century, when inventors in Europe " * 18


@pytest.fixture(scope="module")
def aio():
    """Runs coroutines on one event loop for the whole module, as a server has one (gRPC's asyncio poller
    stays bound to the loop it began on: a loop per test leaves it calling into closed ones)."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(scope="module")
def cluster(smollm2_path):
    """Five nodes (three stages, two spares). Restarts run on one long-lived thread: a node gets SIGTERM
    when the thread that started it ends (the parent-death signal, see coordinator/sdk/local_nodes.py)."""
    args = ["--no-benchmark", "--memory-limit", LIMIT]
    with LocalNodes(5, model_dir=smollm2_path.parent, name="rec", node_args=args) as c:
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
    assert len(ids) > 250  # a prefill long enough (hundreds of ms) for a kill to land in it
    return ids


@contextlib.asynccontextmanager
async def ring(cluster, path):
    """The three-stage ring (nodes that hold a stage keep it: no reload) with every node as a candidate."""
    await restart_dead(cluster)
    clients, infos = await connect(cluster.addresses)
    await asyncio.gather(*(c.close() for c in clients))
    specs, chosen = even_split(30, 3), []
    for spec in specs:
        holder = [
            c.address
            for c, i in zip(clients, infos)
            if i.loaded and (i.shard.start_layer, i.shard.end_layer) == (spec.start_layer, spec.end_layer)
        ]
        free = [a for a in cluster.addresses if a not in chosen and a not in holder]
        chosen.append(next((a for a in holder if a not in chosen), None) or free[0])
    d = await deploy(chosen, path.name, 30, None, specs=specs)
    pipe = resilient(d, await d.pipeline(), path, candidates=cluster.addresses, policy=POLICY)
    try:
        yield pipe
    finally:
        await pipe.aclose()
        await d.close()


async def restart_dead(cluster) -> None:
    loop = asyncio.get_running_loop()
    for i, proc in enumerate(cluster.procs):
        if proc.poll() is not None:
            await loop.run_in_executor(cluster.restarter, cluster.restart, i)


def proc_of(cluster, pipe, stage: int) -> int:
    """Index of the node process serving `stage` of the current plan."""
    return cluster.addresses.index(pipe.deployment.plan[stage]["address"])


def kill(cluster, i: int, sig=signal.SIGKILL) -> None:
    os.kill(cluster.procs[i].pid, sig)
    if sig == signal.SIGKILL:
        cluster.procs[i].wait()


async def tokens(pipe, prompt, sampling=GREEDY, on_token=None) -> list[int]:
    """MAX_TOKENS tokens (no stop tokens: every position is compared); `on_token(n)` after the n-th."""
    out = []
    async for t in generate(pipe, Sequence(prompt, sampling, MAX_TOKENS)):
        out.append(t)
        if on_token is not None:
            await on_token(len(out))
    return out


class KillAt:
    """A Pipeline in front of another that kills a node while the step feeding `position` is in flight
    (position < prompt length: during the prefill). `latency_s`: from the kill to the next token."""

    def __init__(self, pipe, position: int, do_kill) -> None:
        self.pipe, self.position, self.do_kill = pipe, position, do_kill
        self.killed_at: float | None = None
        self.latency_s: float | None = None

    async def open(self, session_id, sampling, max_len=0):
        await self.pipe.open(session_id, sampling, max_len)

    async def close(self, session_id):
        await self.pipe.close(session_id)

    async def step(self, session_id, start, tokens, sample=True):
        call = asyncio.ensure_future(self.pipe.step(session_id, start, tokens, sample))
        if self.killed_at is None and start <= self.position < start + len(tokens):
            await asyncio.sleep(0.03)  # the step is on its way around the ring
            done_before = call.done()
            self.do_kill()
            self.killed_at = time.perf_counter()
            if done_before:  # it made it: the next step is the first to meet the failure
                return await call
        token = await call
        if self.killed_at is not None and self.latency_s is None and token is not None:
            self.latency_s = time.perf_counter() - self.killed_at
        return token


@pytest.fixture(scope="module")
def reference(aio, cluster, smollm2_path, prompt):
    """Uninterrupted runs on the three-stage ring: greedy and seeded."""

    async def run():
        async with ring(cluster, smollm2_path) as pipe:
            return await tokens(pipe, prompt), await tokens(pipe, prompt, SEEDED)

    return aio(run())


def test_chaos_sigkill_at_random_points_keeps_the_output(aio, cluster, smollm2_path, prompt, reference):
    greedy, _ = reference
    rng = random.Random(20240607)
    n = len(prompt)
    last = (
        n + MAX_TOKENS - 3
    )  # the last kill point with a step after it (a kill after the last token is moot)
    trials = [  # (stage, position fed when the node dies): prefill, early/late decode, every stage
        (0, 0),
        (2, 0),
        (1, n + rng.randrange(1, 20)),
        (0, n + rng.randrange(20, 45)),
        (2, n + rng.randrange(45, MAX_TOKENS - 3)),
        (1, last),
    ]
    latencies = []

    async def run():
        async with ring(cluster, smollm2_path) as pipe:
            for stage, position in trials:
                victim = proc_of(cluster, pipe, stage)
                chaos = KillAt(pipe, position, lambda v=victim: kill(cluster, v))
                got = await tokens(chaos, prompt)
                assert got == greedy, f"stage {stage} killed at position {position}: output changed"
                event = pipe.events[-1]
                assert event.outcome == "recovered" and cluster.addresses[victim] in event.nodes[0], event
                assert event.action.startswith("replaced") and event.plan_id == pipe.epoch
                latencies.append((stage, position - n, chaos.latency_s, event.load_ms))
                await restart_dead(cluster)  # the victim comes back empty: the next spare

    aio(run())
    for stage, pos, lat, load in latencies:
        when = "in the prefill" if pos < 0 else f"at decode step {pos}"
        print(f"stage {stage} killed {when}: next token after {lat:.2f} s (load {load:.0f} ms)")
    assert len(latencies) == len(trials)


def test_kill_during_load_then_a_second_node(aio, cluster, smollm2_path, prompt, reference):
    greedy, _ = reference

    async def run():
        for i in range(3, 5):  # fresh spares: a replacement must really load (not reuse a shard it holds)
            kill(cluster, i)
        async with ring(cluster, smollm2_path) as pipe:
            await kill_during_load(pipe)

    async def kill_during_load(pipe):
        plan_nodes = {e["address"] for e in pipe.deployment.plan}
        idle = [i for i, a in enumerate(cluster.addresses) if a not in plan_nodes]

        async def kill_the_replacement() -> None:
            while pipe.state != "recovering":
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # re-placed (tens of ms), loading (seconds: the spares are fresh)
            kill(cluster, idle[0])

        watcher = []

        async def chaos(n: int) -> None:
            # (on_token runs while generate() waits at its yield: the failure shows at the next step)
            if n == 10:  # a node dies, and then the spare taking its place dies while loading
                kill(cluster, proc_of(cluster, pipe, 1))
                watcher.append(asyncio.ensure_future(kill_the_replacement()))
            if n == 40:  # later, another node: the restarted ones are the spares now
                await restart_dead(cluster)
                kill(cluster, proc_of(cluster, pipe, 0))

        assert await tokens(pipe, prompt, on_token=chaos) == greedy
        await asyncio.wait_for(watcher[0], 1)
        first, second = pipe.events
        assert first.outcome == second.outcome == "recovered"
        assert first.attempts == 2 and first.plan[1]["address"] == cluster.addresses[idle[1]], first
        assert first.load_ms > 0 and first.replay_ms > 0 and first.pause_ms >= first.load_ms

    try:
        aio(run())
    finally:
        aio(restart_dead(cluster))


def test_a_hung_node_is_found_by_the_deadline(aio, cluster, smollm2_path, prompt, reference):
    greedy, _ = reference
    stopped: list[int] = []

    async def run():
        async with ring(cluster, smollm2_path) as pipe:

            async def hang(n: int) -> None:
                if n == 12:
                    stopped.append(proc_of(cluster, pipe, 1))
                    kill(cluster, stopped[0], signal.SIGSTOP)  # alive, connected, silent

            assert await tokens(pipe, prompt, on_token=hang) == greedy
            (event,) = pipe.events
            assert "silent" in event.cause and event.outcome == "recovered"
            # found by the step deadline plus `hang_s` of silence, not by a broken stream
            assert event.probe_ms >= POLICY.hang_s * 1e3

    try:
        aio(run())
    finally:
        for i in stopped:
            os.kill(cluster.procs[i].pid, signal.SIGCONT)
            kill(cluster, i)
        aio(restart_dead(cluster))


def test_every_sequence_in_flight_is_replayed_and_new_ones_wait(aio, cluster, smollm2_path):
    # short prompts: every batch stays under 24 rows, where a batched row computes exactly as a lone one
    # (int4/int8 kernels switch to a dense matmul for more rows, node/lowbit/layers.py), so concurrent sequences
    # must match their runs alone
    from edgeshard.node.weights.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(smollm2_path)
    a, b, c = (tok.encode(t) for t in ("The capital of France is", "def fibonacci(n):", "Once upon a time"))

    async def run():
        async with ring(cluster, smollm2_path) as pipe:
            alone = [await tokens(pipe, ids) for ids in (a, b, c)]
            late = []

            async def arrive_during_recovery() -> None:
                while pipe.state != "recovering":
                    await asyncio.sleep(0.01)
                late.append(await tokens(pipe, c))  # waits for the new plan, then runs on it

            async def chaos(n: int) -> None:
                if n == 10:
                    kill(cluster, proc_of(cluster, pipe, 1))
                    late.append(asyncio.ensure_future(arrive_during_recovery()))

            together = await asyncio.gather(tokens(pipe, a, on_token=chaos), tokens(pipe, b))
            await asyncio.wait_for(late[0], 60)
            (event,) = pipe.events
            return alone, together, late[1], event

    try:
        alone, together, late, event = aio(run())
    finally:
        aio(restart_dead(cluster))
    assert together == alone[:2] and late == alone[2]
    assert event.sessions == 2 and event.outcome == "recovered"


def test_seeded_sampling_survives_a_kill(aio, cluster, smollm2_path, prompt, reference):
    _, seeded = reference

    async def run():
        async with ring(cluster, smollm2_path) as pipe:
            chaos = KillAt(pipe, len(prompt) + 20, lambda: kill(cluster, proc_of(cluster, pipe, 2)))
            return await tokens(chaos, prompt, SEEDED), pipe.events

    try:
        got, events = aio(run())
    finally:
        aio(restart_dead(cluster))
    assert len(events) == 1 and got == seeded


def test_too_few_nodes_fail_clearly_and_serving_resumes(aio, cluster, smollm2_path, prompt, reference):
    from edgeshard.node.weights.tokenizer import Tokenizer

    greedy, _ = reference
    tokenizer = Tokenizer.from_checkpoint(smollm2_path)
    request = GenerationRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)

    async def run():
        async with ring(cluster, smollm2_path) as pipe:
            engine = Engine(pipe, tokenizer, "smollm2", 8192, info=resilient_info(pipe))
            try:
                await down_and_up(pipe, engine)
            finally:
                await engine.aclose()

    async def down_and_up(pipe, engine):
        old_plan, old_clients = pipe.epoch, pipe.deployment.clients
        plan_nodes = {e["address"] for e in pipe.deployment.plan}
        spare = next(i for i, a in enumerate(cluster.addresses) if a not in plan_nodes)
        victims = [proc_of(cluster, pipe, 0), proc_of(cluster, pipe, 1), spare]
        left = [a for i, a in enumerate(cluster.addresses) if i not in victims]
        with pytest.raises(CapacityError) as failed:
            async for _ in engine.submit(request):  # a token, then three nodes die at once: two are left
                if cluster.procs[spare].poll() is None:
                    for i in victims:
                        kill(cluster, i)
        message = str(failed.value)
        assert failed.value.status == 503 and failed.value.missing_bytes > 0
        assert all(a in message for a in left), message
        assert "short" in message and "Add a node with at least" in message, message
        with pytest.raises(ServerUnavailableError, match="Add a node") as refused:  # new requests: at once
            engine.submit(request)
        assert refused.value.status == 503 and refused.value.code == "insufficient_memory"  # docs/recovery.md
        info = (await engine.cluster_info())["recovery"]
        assert info["state"] == "down" and info["recoveries"][-1]["outcome"] == "capacity"
        assert all(info["nodes"][cluster.addresses[i]]["state"] == "down" for i in victims)

        await restart_dead(cluster)  # the boards come back: the server serves again by itself
        deadline = time.monotonic() + 30
        while pipe.broken is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        info = (await engine.cluster_info())["recovery"]
        assert info["state"] == "serving" and info["recoveries"][-1]["cause"] == "enough nodes are back"
        assert all(info["nodes"][cluster.addresses[i]]["state"] == "up" for i in victims)  # marked up again
        assert await tokens(pipe, prompt) == greedy
        assert (await engine.complete(request)).usage.completion_tokens > 0

        # epoch fencing: a node that served throughout refuses the first plan's id
        survivor = next(c for c in old_clients if c.address in left)
        stale = RemotePipeline([survivor], old_plan)
        await stale.start()
        try:
            with pytest.raises(RemoteStepError, match="stale plan id"):
                await stale.open("from-the-old-plan", SamplingParams())
        finally:
            await stale.aclose()

    try:
        aio(run())
    finally:
        aio(restart_dead(cluster))
