"""mDNS and a generation across three "hosts": network namespaces on a bridge this test builds.

    es<tag>br   a namespace holding only the bridge br0
    es<tag>h1..h3   node hosts: eth0 = 10.77.0.1-3/24 (a veth whose other end is on br0), lo up,
                    a multicast route 224.0.0.0/4 dev eth0; one `edgeshard node` each
    es<tag>h4   the coordinator: 10.77.0.4/24; runs `edgeshard run --discover`

Every link is created inside the namespaces (`ip link add ... netns`), so nothing is ever added to, or sent
from, the machine's own network; the addresses exist only inside the namespaces. The namespaces are deleted
in a finalizer, also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from edgeshard.coordinator.sdk.local_nodes import LocalNodes

pytestmark = [pytest.mark.slow, pytest.mark.netns]
SUBNET = "10.77.0"  # private /24, inside the test's namespaces only


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class NetnsLab:
    """Namespaces h1..hN on one bridge; `exec(i, cmd)` prefixes a command to run inside host i."""

    def __init__(self, hosts: int) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"es{self.tag}br"
        self.hosts = [f"es{self.tag}h{i}" for i in range(1, hosts + 1)]
        self.made: list[str] = []

    def address(self, i: int) -> str:
        """The IPv4 address of host i (1-based)."""
        return f"{SUBNET}.{i}"

    def exec(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` run inside host i's namespace."""
        return ["ip", "netns", "exec", self.hosts[i - 1], *cmd]

    def build(self) -> None:
        """Make the namespaces, the bridge, one veth per host, addresses and multicast routes."""
        for ns in (self.bridge, *self.hosts):
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts, 1):
            _ip(
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                self.bridge,
            )
            _ip("-n", self.bridge, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")  # mDNS needs a multicast route

    def destroy(self) -> None:
        """Delete every namespace made (their veths and the bridge go with them)."""
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made = []


@pytest.fixture
def lab():
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux-only")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (apt-get install iproute2)")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    lab = NetnsLab(4)
    try:
        lab.build()
    except subprocess.CalledProcessError as e:
        lab.destroy()
        pytest.skip(f"cannot build network namespaces here: {' '.join(e.cmd)}: {e.stderr.strip()}")
    yield lab
    lab.destroy()


class NamespacedNodes(LocalNodes):
    """One node process per namespace host, each announcing on its own eth0 address."""

    def __init__(
        self, lab: NetnsLab, hosts: list[int], cluster: str, model_dir: Path, extra: list[str]
    ) -> None:
        super().__init__(len(hosts), model_dir=model_dir, threads=1, name="host")
        self.lab, self.hosts, self.cluster, self.extra = lab, hosts, cluster, extra

    def command(self, i: int) -> list[str]:
        ip = self.lab.address(self.hosts[i])
        cmd = [a for a in super().command(i) if a != "--no-advertise"]
        cmd[cmd.index("--host") + 1] = ip
        cmd[cmd.index("--port") + 1] = "50051"
        return self.lab.exec(
            self.hosts[i], cmd + ["--mdns-interface", ip, "--cluster", self.cluster, *self.extra]
        )


def test_generation_across_three_hosts(lab, smollm2_path):
    cluster = f"netns-{lab.tag}"
    # 45 MiB each: two hosts cannot hold the model with a 512-token cache, three can
    with NamespacedNodes(
        lab, [1, 2, 3], cluster, Path(smollm2_path).parent, ["--memory-limit", "45M"]
    ) as nodes:
        run = subprocess.run(
            lab.exec(
                4,
                [
                    sys.executable,
                    "-m",
                    "edgeshard.coordinator.cli",
                    "run",
                    "--model",
                    str(smollm2_path),
                    "--discover",
                    "--mdns-interface",
                    lab.address(4),
                    "--cluster",
                    cluster,
                    "--timeout",
                    "4",
                    "--context",
                    "512",
                    "--prompt",
                    "The capital of France is",
                    "--max-tokens",
                    "8",
                    "--temperature",
                    "0",
                    "--json",
                    *nodes.security_args(),  # the nodes' cluster key: the coordinator must hold it too
                ],
            ),
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        logs = "\n".join(nodes.log_tail(i) for i in range(3))
        assert run.returncode == 0, f"{run.stderr}\n--- node logs ---\n{logs}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(p["address"] for p in result["plan"]) == [f"{lab.address(i)}:50051" for i in (1, 2, 3)]
    local = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeshard.coordinator.cli",
            "run",
            "--model",
            str(smollm2_path),
            "--local",
            "--threads",
            "1",
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result["tokens"] == json.loads(local.stdout.strip().splitlines()[-1])["tokens"]
