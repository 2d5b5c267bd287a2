"""A node refuses bad input by name and keeps serving; it stops cleanly; users get one-line errors."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

import grpc
import psutil
import pytest
import torch

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.pipeline.remote import RemoteStepError
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.security.channels import ClusterKey, channel
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.options import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from edgeshard.node.wire.tensors import MAX_STEP_ROWS, tensor_to_wire

pytestmark = pytest.mark.slow
PROMPT = [1, 504, 3458, 282, 4649, 314, 8411, 30]
D = 576  # SmolLM2-135M hidden size
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def _send_raw(address: str, msgs: list[pb.ForwardMessage]) -> list[pb.ForwardReply]:
    """Send messages on a fresh Forward stream; the replies (one per refused message)."""
    async with channel(address, options=GRPC_OPTIONS) as ch:
        call = pb_grpc.NodeStub(ch).Forward()
        replies = []
        for m in msgs:
            await call.write(m)
            replies.append(await asyncio.wait_for(call.read(), 30))
        await call.done_writing()
        return replies


async def _greedy(pipe) -> list[int]:
    return [t async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), 12))]


def test_malformed_messages_are_refused_and_the_node_keeps_serving(node_cluster, smollm2_path):
    async def run():
        d = await deploy(node_cluster.addresses, smollm2_path.name, 30)
        pipe = await d.pipeline()
        try:
            before = await _greedy(pipe)
            plan = d.plan_id
            await pipe.open("live", SamplingParams())  # a real session, so only the named fault is wrong
            await pipe.step("live", 0, PROMPT)

            zeros = tensor_to_wire(torch.zeros(1, D, dtype=torch.bfloat16))
            cases = {  # what is wrong -> (message to node 2, words the error must contain)
                "shape": (
                    pb.Tensor(dtype=pb.DTYPE_BF16, shape=[1, D + 1], data=b"\0" * 2 * (D + 1)),
                    "shape",
                ),
                "rank": (pb.Tensor(dtype=pb.DTYPE_BF16, shape=[1, 1, D], data=zeros.data), "shape"),
                "dtype": (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1, D], data=zeros.data), "dtype"),
                "bytes": (pb.Tensor(dtype=pb.DTYPE_BF16, shape=[1, D], data=zeros.data[:-2]), "bytes"),
                "f32 bytes": (pb.Tensor(dtype=pb.DTYPE_F32, shape=[1, D], data=zeros.data), "bytes"),
                "oversized": (
                    pb.Tensor(
                        dtype=pb.DTYPE_BF16,
                        shape=[MAX_STEP_ROWS + 1, D],
                        data=b"\0" * 2 * D * (MAX_STEP_ROWS + 1),
                    ),
                    "rows",
                ),
            }
            msgs = [
                pb.ForwardMessage(plan_id=plan, session_id="live", start=len(PROMPT), hidden=t)
                for t, _ in cases.values()
            ]
            msgs += [
                pb.ForwardMessage(plan_id=plan, session_id="nope", start=0, hidden=zeros),  # unknown session
                pb.ForwardMessage(
                    plan_id=plan - 1, session_id="live", start=len(PROMPT), hidden=zeros
                ),  # stale
                pb.ForwardMessage(plan_id=plan, session_id="live", start=99, hidden=zeros),  # skips positions
                pb.ForwardMessage(
                    plan_id=plan, session_id="live", start=len(PROMPT), tokens=pb.TokenIds(ids=[1])
                ),  # tokens to a middle node
                pb.ForwardMessage(plan_id=plan, session_id="live"),  # no payload
            ]
            words = [w for _, w in cases.values()] + [
                "unknown session",
                "stale plan id",
                "position 99",
                "hidden states",
                "payload",
            ]
            replies = await _send_raw(node_cluster.addresses[1], msgs)
            for reply, want in zip(replies, words, strict=True):
                assert reply.error.code == INVALID, reply
                assert want in reply.error.message, (want, reply.error.message)
                assert reply.error.node == "test-node2"
            # the first node checks token ids
            (bad,) = await _send_raw(
                node_cluster.addresses[0],
                [
                    pb.ForwardMessage(
                        plan_id=plan, session_id="live", start=len(PROMPT), tokens=pb.TokenIds(ids=[10**9])
                    )
                ],
            )
            assert bad.error.code == INVALID and "token ids must be in" in bad.error.message
            # beyond gRPC's own limit: the transport refuses it, the node is unaffected
            async with channel(
                node_cluster.addresses[1], options=[("grpc.max_send_message_length", -1)]
            ) as ch:
                call = pb_grpc.NodeStub(ch).Forward()
                huge = pb.Tensor(dtype=pb.DTYPE_BF16, shape=[MAX_MESSAGE_BYTES // (2 * D) + 1, D])
                huge.data = b"\0" * (huge.shape[0] * 2 * D)
                await call.write(pb.ForwardMessage(plan_id=plan, session_id="live", hidden=huge))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call.read()
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # an error travels the ring to the coordinator waiting for that step
            with pytest.raises(RemoteStepError, match="unknown session") as e:
                await pipe.step("never-opened", 0, PROMPT)
            assert e.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
            await pipe.close("live")
            after = await _greedy(pipe)
            infos = [await c.info() for c in d.clients]
            return before, after, infos
        finally:
            await pipe.aclose()
            await d.close()

    before, after, infos = asyncio.run(run())
    assert after == before
    assert infos[1].stats.errors >= 11
    assert infos[1].stats.sessions == 0  # every session was ended on every node


def test_load_refuses_paths_outside_the_model_dir(node_cluster):
    async def run():
        async with channel(node_cluster.addresses[0]) as ch:
            stub = pb_grpc.NodeStub(ch)
            for ref in ("../../../etc/passwd", "/etc/passwd", "sub/../../x.gguf"):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.LoadShard(
                        pb.LoadShardRequest(
                            model=ref, start_layer=0, end_layer=30, next_hop="last", plan_id=1
                        )
                    ):
                        pass
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "refused" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.LoadShard(
                    pb.LoadShardRequest(
                        model="missing.gguf", start_layer=0, end_layer=1, next_hop="last", plan_id=1
                    )
                ):
                    pass
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(run())


def test_sigterm_stops_a_node_cleanly(smollm2_path):
    with LocalNodes(1, model_dir=smollm2_path.parent, name="term") as cluster:
        proc = cluster.procs[0]

        async def hold_stream_then_term():
            async with channel(cluster.addresses[0]) as ch:
                call = pb_grpc.NodeStub(ch).Forward()  # an open stream must not keep the node alive
                await call.write(pb.ForwardMessage(session_id="x"))
                await call.read()  # refused: no shard loaded
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 15)

        asyncio.run(hold_stream_then_term())
        assert proc.returncode == 0, cluster.log_tail(0)
        assert "Traceback" not in cluster.log_tail(0, 200)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeshard.coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def test_unreachable_node_is_a_one_line_error(smollm2_path, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    key = ["--cluster-key-file", str(ClusterKey.generate().save(tmp_path / "cluster.key"))]
    r = _cli("run", "--peers", address, "--model", str(smollm2_path), "--prompt", "hi", *key, timeout=120)
    assert r.returncode != 0
    assert address in r.stderr and "not reachable" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cluster_command_generates_and_leaves_no_children(smollm2_path):
    r = _cli(
        "cluster",
        "--nodes",
        "2",
        "--model",
        str(smollm2_path),
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert '"completion_tokens": 8' in r.stdout.strip().splitlines()[-1]
    assert (
        "per node" in r.stderr and "node2" in r.stderr and "15-29" in r.stderr
    )  # the table (stderr with --json)


def test_cluster_children_die_with_a_killed_parent(smollm2_path):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeshard.coordinator.cli",
            "cluster",
            "--nodes",
            "2",
            "--model",
            str(smollm2_path),
            "--http",
            "127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and parent.poll() is None:
            children = psutil.Process(parent.pid).children()
            infos = [c for c in children if "edgeshard.node.service.server" in " ".join(c.cmdline())]
            if len(infos) == 2:
                break
            time.sleep(0.5)
        assert len(children) == 2, f"cluster exited early with {parent.poll()}"
        parent.kill()  # no cleanup code runs in the parent: the children must notice on their own
        parent.wait()
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"node processes outlived their parent: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_dead_middle_node_fails_the_step_fast_with_its_address(smollm2_path):
    with LocalNodes(3, model_dir=smollm2_path.parent, name="dies") as cluster:

        async def run():
            d = await deploy(cluster.addresses, smollm2_path.name, 30)
            pipe = await d.pipeline()
            try:
                assert len(await _greedy(pipe)) == 12
                cluster.procs[1].kill()
                cluster.procs[1].wait()
                with pytest.raises(RemoteStepError) as e:
                    await asyncio.wait_for(_greedy(pipe), 30)  # an error, not a hang
                return e.value
            finally:
                await pipe.aclose()
                await d.close()

        err = asyncio.run(run())
        assert err.grpc_code == grpc.StatusCode.UNAVAILABLE
        assert cluster.addresses[1] in str(err) and "dies1" in str(err)
