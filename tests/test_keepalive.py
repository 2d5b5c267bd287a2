"""Idle hours change nothing: clients ping every keepalive period and nodes accept those pings.

Before, the clients pinged every 20 s but a node's gRPC server accepted a ping without data only every
5 minutes: after ~80 s of idle it answered GOAWAY `too_many_pings`, the streams broke and the next request
rebuilt a healthy ring ("node ... is not reachable (Too many pings)"). Here the period is 0.25 s
($EDGESHARD_KEEPALIVE_S, read by every process at start), so idling 4 s is 16 periods: the run happens in a
child process (coordinator and nodes alike must start with the short period) and reports what it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PERIOD_S = 0.25
IDLE_S = 4.0


def test_an_idle_ring_keeps_its_streams(smollm2_path):
    env = {**os.environ, "EDGESHARD_KEEPALIVE_S": str(PERIOD_S)}
    run = subprocess.run(
        [sys.executable, __file__, str(smollm2_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["keepalive_ms"] == PERIOD_S * 1000  # the child really ran with the short period
    assert seen["recoveries"] == [], seen  # nothing was "recovered" after the idle time
    assert seen["before"] == seen["after"] and len(seen["after"]) == 8
    for text in [run.stderr, *seen["node_logs"]]:
        assert "too_many_pings" not in text and "Too many pings" not in text, text[-2000:]
        assert "broke" not in text, text[-2000:]  # no stream to a next hop broke meanwhile


def _child(model_path: Path) -> None:
    """Three nodes, one ring: a request, IDLE_S of nothing, the same request; print what happened as JSON."""
    from edgeshard.coordinator.pipeline.deploy import deploy
    from edgeshard.coordinator.pipeline.generate import Sequence, generate
    from edgeshard.coordinator.recovery.resilient import resilient
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes
    from edgeshard.node.model.sampling import SamplingParams
    from edgeshard.node.wire.options import KEEPALIVE_MS

    async def main(nodes: LocalNodes) -> dict:
        d = await deploy(nodes.addresses, model_path.name, 30, None)
        pipe = resilient(d, await d.pipeline(), model_path, candidates=nodes.addresses)

        async def request() -> list[int]:
            seq = Sequence([1, 504, 3458, 314, 4649, 314], SamplingParams(), 8)
            return [t async for t in generate(pipe, seq)]

        try:
            before = await request()
            await asyncio.sleep(IDLE_S)
            after = await request()
            return {"before": before, "after": after, "recoveries": pipe.recoveries}
        finally:
            await pipe.aclose()
            await d.close()

    with LocalNodes(3, model_dir=model_path.parent, name="idle", node_args=["--no-benchmark"]) as nodes:
        seen = asyncio.run(main(nodes))
        seen["node_logs"] = [nodes.log_tail(i, 200) for i in range(3)]
    seen["keepalive_ms"] = KEEPALIVE_MS
    print(json.dumps(seen, default=str))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
