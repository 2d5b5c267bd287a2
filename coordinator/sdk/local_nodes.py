"""Local node processes on 127.0.0.1 (classroom/demo mode, tests, benchmarks), which die with their parent.

`LocalNodes(n, model_dir)` starts n `edgeshard node` processes with `--port 0` and waits for each to print
its READY line. The children die with the parent three ways: `stop()` (also from `with`, on errors), the
Linux parent-death signal (SIGTERM when the parent dies, even by SIGKILL), and the node's own watchdog on
EDGESHARD_PARENT_PID (other POSIX systems). The node arms the parent-death signal itself (see
`node.server.die_with_parent`): no preexec_fn here, so Popen can spawn without running gRPC's fork handlers.
Children of a thread die with that thread on Linux, so start a cluster from a thread that lives as long.

Security: the nodes get the cluster key of this process (`--cluster-key-file`, in the private log
directory) - the configured one, else an ephemeral key made here and configured for this process, so the
coordinator in this process talks to them with no set-up (`for_local_nodes`); `security=INSECURE` starts
them with `--insecure`.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from edgeshard.coordinator.errors import ClusterError
from edgeshard.node.security.channels import ClusterKey, NodeCredentials, Security, for_local_nodes
from edgeshard.node.service.server import PARENT_PID_ENV, READY_PREFIX

_READY = re.compile(rf"^{READY_PREFIX} port=(\d+)")
# seconds a local node may take to start; EDGESHARD_NODE_START_TIMEOUT raises it (slow boards, emulation in CI)
START_TIMEOUT_S = float(os.environ.get("EDGESHARD_NODE_START_TIMEOUT") or 60.0)


class LocalNodes:
    """N node processes on loopback; `addresses` once started. Use as a context manager."""

    def __init__(
        self,
        n: int,
        model_dir: Path | None = None,
        threads: int = 1,
        name: str = "node",
        max_sessions: int = 64,
        log_dir: Path | None = None,
        security: Security | None = None,
        node_args: Sequence[str] = (),
        model_dirs: Sequence[Path] | None = None,
    ) -> None:
        if n < 1:
            raise ClusterError(f"a cluster needs at least 1 node, got {n}")
        self.n, self.model_dir, self.threads, self.name = n, model_dir, threads, name
        self.max_sessions = max_sessions
        self.node_args = list(node_args)  # more `edgeshard node` flags for every node (--memory-limit 300M)
        # one --model-dir per node (weight shipping: each fills its own slice cache); overrides model_dir
        self.model_dirs = list(model_dirs) if model_dirs is not None else None
        if self.model_dirs is not None and len(self.model_dirs) != n:
            raise ClusterError(f"{len(self.model_dirs)} model directories for {n} nodes; give one per node")
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="edgeshard-cluster-")
        self.log_dir = Path(log_dir or self._tmp.name)
        # the cluster key of these nodes: the one configured, else an ephemeral one (node/security/channels.py)
        self.security = security if security is not None else for_local_nodes()
        self.key_file: Path | None = None  # the key as a file (0600, in log_dir) for nodes and CLI runs
        self.creds_file: Path | None = None  # or an enrolled node's credentials (#20), as a file
        if isinstance(self.security, ClusterKey):
            self.key_file = self.security.save(self.log_dir / "cluster.key", overwrite=True)
        elif isinstance(self.security, NodeCredentials):
            self.creds_file = self.security.save(self.log_dir / "node.creds", overwrite=True)
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def command(self, i: int) -> list[str]:
        """The command line of node i."""
        cmd = [
            sys.executable,
            "-m",
            "edgeshard.node.service.server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--name",
            f"{self.name}{i + 1}",
            "--threads",
            str(self.threads),
            "--no-advertise",
            "--max-sessions",
            str(self.max_sessions),
            "--state-dir",
            str(self.log_dir / f"state{i + 1}"),
        ]  # one identity per node process
        if self.model_dirs is not None:
            cmd += ["--model-dir", str(self.model_dirs[i])]
        elif self.model_dir is not None:
            cmd += ["--model-dir", str(self.model_dir)]
        cmd += self.security_args()
        return cmd + self.node_args

    def security_args(self) -> list[str]:
        """`--cluster-key-file F` (or `--insecure`): how these nodes, and commands run against them, get in."""
        if self.creds_file is not None:
            return ["--credentials", str(self.creds_file)]
        return ["--cluster-key-file", str(self.key_file)] if self.key_file else ["--insecure"]

    def start(self, timeout: float = START_TIMEOUT_S) -> list[str]:
        """Start the nodes and wait until every one listens; their addresses in order."""
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid()), "OMP_NUM_THREADS": str(self.threads)}
        try:
            for i in range(self.n):
                self.procs.append(self._spawn(i, self.command(i), env, "wb"))
            self.addresses = [
                f"127.0.0.1:{self._wait_ready(i, time.monotonic() + timeout)}" for i in range(self.n)
            ]
        except BaseException:
            self.stop()
            raise
        return self.addresses

    def _spawn(self, i: int, cmd: list[str], env: dict, mode: str) -> subprocess.Popen:
        with (self.log_dir / f"{self.name}{i + 1}.log").open(mode) as log:
            return subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env
            )

    def restart(self, i: int, timeout: float = START_TIMEOUT_S) -> str:
        """Start node i again at its old address once it is gone (killed, crashed): a board that rebooted.

        It comes back with fresh state (no shard, no sessions) and the same port; its log goes on in the same
        file. Returns its address.
        """
        if self.procs[i].poll() is None:
            raise ClusterError(f"local node {self.name}{i + 1} is still running; stop or kill it first")
        with contextlib.suppress(OSError):
            self.procs[i].stdout.close()
        cmd = self.command(i)
        cmd[cmd.index("--port") + 1] = self.addresses[i].rsplit(":", 1)[1]
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid()), "OMP_NUM_THREADS": str(self.threads)}
        self.procs[i] = self._spawn(i, cmd, env, "ab")
        self._wait_ready(i, time.monotonic() + timeout)
        return self.addresses[i]

    def _wait_ready(self, i: int, deadline: float) -> int:
        proc = self.procs[i]
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    m = _READY.match(line)
                    if m:
                        # keep draining stdout so a chatty child never blocks on a full pipe
                        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
                        return int(m.group(1))
        finally:
            sel.close()
        proc.poll()
        status = (
            f"exited with {proc.returncode}" if proc.returncode is not None else "did not get ready in time"
        )
        raise ClusterError(f"local node {self.name}{i + 1} {status}; its log:\n{self.log_tail(i)}")

    def log_tail(self, i: int, lines: int = 15) -> str:
        """The last lines of node i's stderr log."""
        with contextlib.suppress(OSError):
            text = (self.log_dir / f"{self.name}{i + 1}.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no log)"

    def stop(self, timeout: float = 5.0) -> list[int | None]:
        """SIGTERM every node, wait, SIGKILL stragglers; their exit codes."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        codes = [p.returncode for p in self.procs]
        for p in self.procs:
            if p.stdout:
                with contextlib.suppress(OSError):
                    p.stdout.close()
        self.procs = []
        return codes

    def __enter__(self) -> LocalNodes:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def _drain(stream) -> None:
    with contextlib.suppress(OSError, ValueError):
        while stream.read(4096):
            pass
