"""A plan you can trust: three nodes started at the same moment on one machine (mDNS on 127.0.0.1 only) do
not benchmark each other, so `plan --discover` uses all three and predicts the speed `run` then measures.

Slow: it starts node processes and runs the demo model. The 2x bound is the issue's acceptance criterion
(before the benchmark lock, nodes started together predicted 0.3 tok/s against 34 measured); it compares two
speeds measured on the same machine within a minute, not a speed against a fixed number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from edgeshard.coordinator.sdk.local_nodes import LocalNodes

pytestmark = pytest.mark.slow
LOOPBACK = ["--mdns-interface", "127.0.0.1"]
PLAN_KEYS = {"node", "address", "start_layer", "end_layer", "quant", "weight_bytes"}


class SameMomentNodes(LocalNodes):
    """Node processes that advertise on mDNS (127.0.0.1) under a cluster name of their own, benchmark on."""

    def __init__(self, cluster: str, n: int, model_dir: Path) -> None:
        super().__init__(n, model_dir=model_dir, threads=1, name="")  # "": the default name, host:port
        self.cluster = cluster

    def command(self, i: int) -> list[str]:
        cmd = [a for a in super().command(i) if a != "--no-advertise"]
        at = cmd.index("--name")
        del cmd[at : at + 2]
        return cmd + LOOPBACK + ["--cluster", self.cluster]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeshard.coordinator.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.DEVNULL,
    )


def test_plan_over_nodes_started_together_uses_all_and_predicts_the_speed(smollm2_path):
    cluster = f"t-{uuid.uuid4().hex[:10]}"
    with SameMomentNodes(cluster, 3, Path(smollm2_path).parent) as nodes:
        common = ["--model", str(smollm2_path), "--discover", "--cluster", cluster, *LOOPBACK]
        common += ["--timeout", "3", *nodes.security_args()]
        found = _cli(
            "nodes", "--json", "--cluster", cluster, *LOOPBACK, "--timeout", "3", *nodes.security_args()
        )
        rows = json.loads(found.stdout)
        names = sorted(r["node"] for r in rows)
        assert len(rows) == 3 and len(set(names)) == 3, found.stdout  # unique default names: host:port
        assert all(r["name"].rsplit(":", 1)[-1] == r["address"].rsplit(":", 1)[-1] for r in rows)
        speeds = sorted(r["capability"]["int4_gbps"] for r in rows)
        assert speeds[0] > 0 and speeds[-1] / speeds[0] < 3, speeds  # nobody measured under the others' load

        # throughput: the smallest bottleneck stage, so the layers spread over every node (for one sequence the
        # planner rightly keeps a model this small on one node of a machine whose nodes share the cores)
        common += ["--objective", "throughput"]
        planned = _cli("plan", "--json", *common)
        assert planned.returncode == 0, planned.stderr
        plan = json.loads(planned.stdout)
        assert len(plan["stages"]) == 3 and all(s["end_layer"] > s["start_layer"] for s in plan["stages"])
        assert all(set(e) == PLAN_KEYS for e in plan["plan"])

        run = _cli("run", *common, "--prompt", "Count from one to twenty.", "--max-tokens", "40", "--json")
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert all(PLAN_KEYS <= set(e) for e in result["plan"])
        # the run plans again from the nodes' figures then (re-measured while idle): all three hold layers
        assert len(result["plan"]) == 3 and all(e["end_layer"] > e["start_layer"] for e in result["plan"])
        measured, predicted = result["decode_tok_per_s"], result["predicted_tok_per_s"]
        assert 0.5 <= measured / predicted <= 2.0, (measured, predicted, plan["stages"], run.stderr)
        assert "warning: decoding ran at" not in run.stderr  # within 2x: no warning


def test_the_speed_warning_names_the_direction_and_the_factor():
    from edgeshard.coordinator.cli.run import speed_warning

    assert speed_warning(10.0, 6.0) is None and speed_warning(6.0, 10.0) is None
    assert "2.5x faster than the plan predicted (4.0 tok/s)" in speed_warning(10.0, 4.0)
    assert "3.0x slower" in speed_warning(10.0, 30.0) and "edgeshard nodes" in speed_warning(10.0, 30.0)
