"""A node's sessions end when nobody can use them any more, and its KV budget is never unlimited.

- A coordinator that crashes (SIGKILL, a real process) leaves sessions on every node; the first node sees
  its Forward stream close, ends them and sends the ends on along the ring: every node frees them.
- A session nobody steps for --session-idle-timeout is ended, though its coordinator's stream stays open.
- Without --kv-budget and --memory-limit a node budgets half the memory available once its weights are
  loaded (node/service/ring.py kv_budget_for), and refuses a session that would not fit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgeshard.node.service.ring import KV_AVAILABLE_FRACTION, RingNode

PROMPT = [1, 504, 3458, 314, 4649, 314, 253, 1345]
SESSIONS = 3


def test_the_kv_budget_defaults_to_half_the_available_memory():
    before = psutil.virtual_memory().available
    budget = RingNode("n").kv_budget_for(10 << 20)
    after = psutil.virtual_memory().available
    lo, hi = sorted((before, after))
    assert lo * KV_AVAILABLE_FRACTION * 0.9 <= budget <= hi * KV_AVAILABLE_FRACTION * 1.1
    assert RingNode("n", kv_budget=123).kv_budget_for(10 << 20) == 123  # --kv-budget wins
    assert RingNode("n", memory_limit=100 << 20).kv_budget_for(30 << 20) == 70 << 20  # what the limit leaves
    assert RingNode("n", memory_limit=10 << 20).kv_budget_for(30 << 20) == 1  # no room: every session refused


async def _infos(addresses: list[str]):
    from edgeshard.coordinator.pipeline.stage_client import connect

    clients, infos = await connect(addresses)
    await asyncio.gather(*(c.close() for c in clients))
    return infos


async def _until_no_sessions(addresses: list[str], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        held = [i.stats.sessions for i in await _infos(addresses)]
        if not any(held) or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.2)


@pytest.mark.slow
def test_a_crashed_coordinators_sessions_are_reaped_on_every_node(smollm2_path):
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes

    args = ["--no-benchmark", "--log-level", "INFO"]
    with LocalNodes(3, model_dir=smollm2_path.parent, name="reap", node_args=args) as nodes:
        child = subprocess.Popen(
            [sys.executable, __file__, str(smollm2_path), *nodes.addresses],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "EDGESHARD_CLUSTER_KEY": nodes.key_file.read_text()},  # the nodes' key
        )
        try:
            line = child.stdout.readline()  # the child prints READY with its sessions open mid-generation
            assert line.strip() == "READY", child.stderr.read()[-3000:] if child.poll() is not None else line
            infos = asyncio.run(_infos(nodes.addresses))
            assert [i.stats.sessions for i in infos] == [SESSIONS] * 3
            assert all(i.shard.kv_budget > 0 for i in infos)  # no flags: a budget all the same
            assert all(i.stats.kv_reserved > 0 for i in infos)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            held = asyncio.run(_until_no_sessions(nodes.addresses, 30))
            assert held == [0, 0, 0]
            assert [i.stats.kv_reserved for i in asyncio.run(_infos(nodes.addresses))] == [0, 0, 0]
            first = nodes.log_tail(0, 400)
            assert first.count("its stream closed") == SESSIONS, first
            assert "idle" not in first
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.mark.slow
def test_an_idle_session_is_ended_though_its_stream_stays_open(smollm2_path):
    from edgeshard.coordinator.pipeline.deploy import deploy
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes
    from edgeshard.node.model.sampling import SamplingParams

    args = ["--no-benchmark", "--log-level", "INFO", "--session-idle-timeout", "1"]
    with LocalNodes(1, model_dir=smollm2_path.parent, name="idle", node_args=args) as nodes:

        async def run() -> tuple[list[int], list[int]]:
            d = await deploy(nodes.addresses, smollm2_path.name, 30, None)
            pipe = await d.pipeline()
            try:
                await pipe.open("forgotten", SamplingParams())
                await pipe.step("forgotten", 0, PROMPT)
                before = [i.stats.sessions for i in await _infos(nodes.addresses)]
                after = await _until_no_sessions(nodes.addresses, 20)
                assert pipe.broken is None  # the coordinator's streams are still up
                return before, after
            finally:
                await pipe.aclose()
                await d.close()

        before, after = asyncio.run(run())
        assert before == [1] and after == [0]
        log = nodes.log_tail(0, 200)
        assert "ending session 'forgotten': it was idle for more than 1 s" in log, log


def _child(model_path: Path, addresses: list[str]) -> None:
    """A coordinator that opens SESSIONS sessions, feeds their prompts, says READY and waits to be killed."""
    from edgeshard.coordinator.pipeline.deploy import deploy
    from edgeshard.node.model.sampling import SamplingParams

    async def main() -> None:
        d = await deploy(addresses, model_path.name, 30, None)
        pipe = await d.pipeline()
        for i in range(SESSIONS):
            await pipe.open(f"s{i}", SamplingParams(), max_len=512)
            await pipe.step(f"s{i}", 0, PROMPT)
        print("READY", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())


if __name__ == "__main__":
    _child(Path(sys.argv[1]), sys.argv[2:])
