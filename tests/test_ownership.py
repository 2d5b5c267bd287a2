"""Plan ownership: a node serves one coordinator's plan at a time (node/service/ownership.py).

The rules on the real `Ownership` object, then the whole story with real processes: a `serve` holds two
nodes, a second coordinator's `run` is refused by them (naming the holder) and the server's answers stay the
same; with --take-over the run gets the nodes, and the server recovers its plan once the run has let go.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeshard.node.service.ownership import Ownership
from edgeshard.node.wire import edgeshard_pb2 as pb


def _load(holder_id: str, take_over: bool = False) -> pb.LoadShardRequest:
    who = pb.PlanHolder(id=holder_id, name=f"edgeshard serve ({holder_id})", host="lab-pc")
    return pb.LoadShardRequest(model="m", plan_id=2, coordinator=who, take_over=take_over)


def test_a_held_node_refuses_others_and_tells_its_holder_when_taken():
    own = Ownership(idle_release_s=60)
    assert own.refusal(_load("a"), "n1", "127.0.0.1:1") is None  # free
    own.loaded(_load("a"), "n1", old_plan_id=0)
    replies: asyncio.Queue = asyncio.Queue()
    own.opened("a", replies)  # a's Forward stream
    assert own.refusal(_load("a"), "n1", "127.0.0.1:1") is None  # its own holder reloads freely
    why = own.refusal(_load("b"), "n1", "127.0.0.1:1")
    assert why and "edgeshard serve (a) on lab-pc" in why and "--take-over" in why and "127.0.0.1:1" in why
    shard = pb.ShardInfo()
    own.fill(shard)
    assert shard.held and shard.holder.id == "a"

    assert own.refusal(_load("b", take_over=True), "n1", "127.0.0.1:1") is None
    own.loaded(_load("b", take_over=True), "n1", old_plan_id=7)
    told = replies.get_nowait()  # a hears who took its node, on its own plan's id
    assert (
        told.plan_id == 7
        and not told.session_id
        and "taken over by edgeshard serve (b)" in told.error.message
    )
    assert own.holder.id == "b" and own.refusal(_load("a"), "n1", "x") is not None


def test_a_node_is_free_after_release_or_when_its_holder_went_quiet():
    own = Ownership(idle_release_s=0.2)
    own.loaded(_load("a"), "n1", 0)
    assert own.release("b") is False and own.held()  # only the holder lets go
    assert own.release("a") is True and not own.held()
    own.loaded(_load("a"), "n1", 0)
    own.opened("a")  # a Results stream: held however long it is quiet
    time.sleep(0.3)
    assert own.held()
    own.closed("a")
    time.sleep(0.3)  # a coordinator that died without releasing frees its nodes after the idle time
    assert not own.held() and own.refusal(_load("b"), "n1", "x") is None


# ---- the story with real processes ------------------------------------------------------------------------------
CLI = [sys.executable, "-m", "edgeshard.coordinator.cli.main"]
ASK = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8}


def _ask(url: str) -> str:
    import httpx

    r = httpx.post(f"{url}/v1/chat/completions", json={**ASK, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_a_second_coordinator_is_refused_and_the_first_keeps_answering(smollm2_path):
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    with LocalNodes(
        2, model_dir=Path(smollm2_path).parent, name="own", node_args=["--no-benchmark"]
    ) as nodes:
        peers = ",".join(nodes.addresses)
        serve = subprocess.Popen(
            [*CLI, "serve", "--model", "smollm2-135m", "--peers", peers, "--http", "127.0.0.1:0"]
            + nodes.security_args(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            url, deadline = None, time.monotonic() + 300
            while url is None and time.monotonic() < deadline:
                line = serve.stderr.readline()
                assert line or serve.poll() is None, "serve exited before serving"
                m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
                url = m and m.group(1)
            assert url
            first = _ask(url)
            assert first

            run = [*CLI, "run", "--model", "smollm2-135m", "--peers", ",".join(reversed(nodes.addresses))]
            run += ["--prompt", "Hi", "--max-tokens", "4", *nodes.security_args()]
            refused = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env)
            assert refused.returncode == 1, refused.stderr
            line = refused.stderr.strip().splitlines()[-1]
            assert line.startswith("edgeshard: error:") and "edgeshard serve (pid" in line, refused.stderr
            assert "--take-over" in line and "Traceback" not in refused.stderr
            assert _ask(url) == first  # nothing was reloaded under the server

            taken = subprocess.run(
                [*run, "--take-over"], capture_output=True, text=True, timeout=300, env=env
            )
            assert taken.returncode == 0, taken.stderr
            # the run let go when it was done: the server re-places its plan and answers as before
            assert _ask(url) == first
        finally:
            serve.terminate()
            serve.wait(30)
