"""The API through a real multi-node cluster: node processes, gRPC ring, HTTP server (slow: starts processes)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai
import psutil
import pytest

from edgeshard.coordinator import LocalCluster
from edgeshard.coordinator.sdk import Client

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name three colors."}]


def _gone(pids: list[int]) -> bool:
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    return not alive


def test_local_cluster_two_nodes_matches_one_process(api_server, smollm2_path):
    with Client(api_server.url) as local:
        expected = local.chat(MESSAGES, max_tokens=16, temperature=0)
    with LocalCluster(model="smollm2-135m", nodes=2) as cluster:
        pids = [p.pid for p in cluster.processes.procs]
        assert len(pids) == 2 and cluster.plan[0]["end_layer"] == cluster.plan[1]["start_layer"]
        client = cluster.client()
        assert client.models()[0]["id"] == "smollm2-135m"
        assert client.chat(MESSAGES, max_tokens=16, temperature=0).text == expected.text
        assert "".join(client.chat(MESSAGES, max_tokens=16, temperature=0, stream=True)) == expected.text
        info = client.cluster_info()
        assert info["mode"] == "cluster" and [n["status"] for n in info["nodes"]] == ["ok", "ok"]
        assert all(n["steps"] > 0 for n in info["nodes"])
        live = info["transfers"]  # weight shipping per node: these nodes hold the file, so nothing shipped
        assert [live[n["address"]]["phase"] for n in info["nodes"]] == ["ready", "ready"]
        assert [live[n["address"]]["shipped_bytes"] for n in info["nodes"]] == [0, 0]
        assert all(n["weight_bytes"] > 0 for n in info["nodes"])
    assert cluster.url is None and _gone(pids)


def test_local_cluster_cleans_up_on_errors():
    with pytest.raises(RuntimeError, match="boom"), LocalCluster(model="smollm2-135m", nodes=1) as cluster:
        pids = [p.pid for p in cluster.processes.procs]
        raise RuntimeError("boom")
    assert _gone(pids)


def test_cluster_command_serves_http_and_stops_on_sigint(smollm2_path):
    """`edgeshard cluster --nodes 2 --http 127.0.0.1:0`, the official openai client against it, then Ctrl-C."""
    cmd = [
        sys.executable,
        "-m",
        "edgeshard.coordinator.cli",
        "cluster",
        "--nodes",
        "2",
        "--model",
        "smollm2-135m",
        "--http",
        "127.0.0.1:0",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        url, deadline = None, time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the cluster command exited before serving"
            m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            url = m and m.group(1)
        assert url, "no URL on stderr"
        nodes = [c.pid for c in psutil.Process(proc.pid).children()]
        assert len(nodes) == 2
        oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = oai.chat.completions.create(
            model="smollm2-135m", messages=MESSAGES, max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while not _gone(nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(nodes)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
