"""mDNS between real node processes: joins and leaves seen live, `nodes`/`plan`/`doctor`/`run --discover`.

Everything stays on loopback: every node and every coordinator binds mDNS to 127.0.0.1 (`--mdns-interface
127.0.0.1`), nodes listen on 127.0.0.1, and each test uses a cluster name no one else uses, so parallel runs
on the same machine never see each other's nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from edgeshard.coordinator.discovery.mdns import ZeroconfDiscovery
from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.security.channels import for_local_nodes

pytestmark = pytest.mark.slow
LOOPBACK = ["--mdns-interface", "127.0.0.1"]


class AdvertisedNodes(LocalNodes):
    """Local node processes that announce themselves on mDNS (127.0.0.1 only), with per-node extra flags."""

    def __init__(
        self,
        cluster: str,
        extra: list[list[str]],
        model_dir: Path | None = None,
        state_dirs: list[Path] | None = None,
    ) -> None:
        super().__init__(len(extra), model_dir=model_dir, threads=1, name=f"d{cluster[-4:]}-")
        self.cluster, self.extra, self.state_dirs = cluster, extra, state_dirs

    def command(self, i: int) -> list[str]:
        cmd = [a for a in super().command(i) if a != "--no-advertise"]
        if self.state_dirs:
            cmd[cmd.index("--state-dir") + 1] = str(self.state_dirs[i])
        return cmd + LOOPBACK + ["--cluster", self.cluster, "--log-level", "INFO", *self.extra[i]]


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgeshard.coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _cluster_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def test_join_update_and_leave_are_seen_live(smollm2_path):
    cluster = _cluster_name()

    async def scenario():
        discovery = ZeroconfDiscovery(["127.0.0.1"], cluster, security=for_local_nodes())
        await discovery.start()
        events = discovery.events()
        nodes = AdvertisedNodes(cluster, [["--threads", "1"]], model_dir=Path(smollm2_path).parent)
        try:
            await asyncio.to_thread(nodes.start)
            join = await asyncio.wait_for(anext(events), 60)
            assert join.kind == "join" and join.member.ok, join
            assert join.member.address == nodes.addresses[0]
            assert join.member.capability.measured and join.member.cluster == cluster
            assert join.member.loaded == ""
            # loading a shard changes the record (loaded range, free memory): an update follows
            deployment = await deploy(nodes.addresses, smollm2_path.name, 30, console=Console(quiet=True))
            await deployment.close()
            update = await asyncio.wait_for(anext(events), 30)
            assert update.kind == "update" and update.member.loaded == "0-30/30", update
            assert update.member.held_bytes > 0
            nodes.procs[0].terminate()  # SIGTERM: the node withdraws its record on the way out
            while (event := await asyncio.wait_for(anext(events), 30)).kind != "leave":
                pass  # an update may come first (the record changed while the node stopped)
            assert event.member.key == join.member.key
            assert await asyncio.to_thread(nodes.procs[0].wait, 10) == 0
            assert discovery.members() == []
        finally:
            nodes.stop()
            await events.aclose()
            await discovery.close()

    asyncio.run(scenario())


def test_nodes_plan_doctor_and_run_discover(smollm2_path, tmp_path):
    cluster = _cluster_name()
    limits = ["90M", "60M"]  # neither holds the whole model: the plan must use both
    extra = [["--threads", "1", "--memory-limit", limits[0]], ["--threads", "1", "--memory-limit", limits[1]]]
    common = ["--cluster", cluster, *LOOPBACK, "--timeout", "3"]
    with AdvertisedNodes(cluster, extra, model_dir=Path(smollm2_path).parent) as nodes:
        common += nodes.security_args()  # the nodes' cluster key (coordinators without it see no one)
        found = _cli("nodes", "--json", *common)
        assert found.returncode == 0, found.stderr
        rows = json.loads(found.stdout)
        assert sorted(r["address"] for r in rows) == sorted(nodes.addresses)
        assert all(r["status"] == "ok" and not r["duplicate_id"] for r in rows)
        assert sorted(r["capability"]["memory_limit"] for r in rows) == [60 << 20, 90 << 20]

        planned = _cli("plan", "--model", str(smollm2_path), "--json", "--context", "512", *common)
        assert planned.returncode == 0, planned.stderr
        plan = json.loads(planned.stdout)
        assert len(plan["stages"]) == 2 and plan["tok_per_s"] > 0
        for s in plan["stages"]:
            assert s["weight_bytes"] + s["kv_bytes"] <= s["usable_bytes"]

        peers = ["--peers", ",".join(nodes.addresses), *nodes.security_args()]
        fixed = _cli(
            "plan", "--model", str(smollm2_path), *peers, "--layers", "18,12", "--context", "512", "--json"
        )
        assert fixed.returncode == 0, fixed.stderr
        assert [s["end_layer"] - s["start_layer"] for s in json.loads(fixed.stdout)["stages"]] == [18, 12]
        short = _cli("plan", "--model", str(smollm2_path), *peers, "--context", "100000")
        assert (
            short.returncode == 1 and "short" in short.stderr and "Add a node with at least" in short.stderr
        )

        doctor = _cli("doctor", "--json", *common)
        checks = {c["name"]: c for c in json.loads(doctor.stdout)}
        assert doctor.returncode == 0, doctor.stdout
        assert checks["multicast"]["ok"] and checks["duplicate id"]["ok"]

        prompt = ["--prompt", "The capital of France is", "--max-tokens", "8", "--temperature", "0", "--json"]
        run = _cli("run", "--model", str(smollm2_path), "--discover", "--context", "512", *common, *prompt)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert [(p["start_layer"], p["end_layer"]) for p in result["plan"]] == [
            (s["start_layer"], s["end_layer"]) for s in plan["stages"]
        ]
        assert result["predicted_tok_per_s"] > 0
    local = _cli("run", "--model", str(smollm2_path), "--local", "--threads", "1", *prompt)
    assert local.returncode == 0, local.stderr
    assert result["tokens"] == json.loads(local.stdout.strip().splitlines()[-1])["tokens"]


def test_duplicate_node_ids_are_reported(tmp_path):
    cluster = _cluster_name()
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:  # a cloned SD card: two machines, one id
        d.mkdir()
        (d / "node_id").write_text("c10ec10ec10ec10ec10ec10ec10ec10e\n")
    with AdvertisedNodes(cluster, [["--name", "twin"], ["--name", "twin"]], state_dirs=dirs) as nodes:
        key = nodes.security_args()
        found = _cli("nodes", "--json", "--cluster", cluster, *LOOPBACK, "--timeout", "3", *key)
        rows = json.loads(found.stdout)
        assert len(rows) == 2 and all(r["duplicate_id"] for r in rows), found.stdout
        doctor = _cli("doctor", "--json", "--cluster", cluster, *LOOPBACK, "--timeout", "3", *key)
        assert doctor.returncode == 1
        assert any(c["name"] == "duplicate id" and not c["ok"] for c in json.loads(doctor.stdout))
        logs = nodes.log_tail(0, 50) + nodes.log_tail(1, 50)
        assert "c10ec10e" in logs and ("duplicate node id" in logs or "announces" in logs)
