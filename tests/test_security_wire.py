"""Every refusal on the wire is a typed status (issue #20, found by benchmarks/fuzz.py). A real node process on
127.0.0.1 with a cluster key; raw bytes through a member's channel."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.security.channels import ClusterKey, channel
from edgeshard.node.wire import edgeshard_pb2 as pb

FORWARD = "/edgeshard.v1.Node/Forward"
CORRUPT = b"\x0a\xff\xff\xff\xff\xff\xff"  # a length prefix far past the end: never a valid message


@pytest.fixture(scope="module")
def keyed_node():
    key = ClusterKey.generate()
    with LocalNodes(1, name="wire", security=key, node_args=["--no-benchmark"]) as nodes:
        yield nodes, key


def test_a_corrupt_message_while_the_node_sends_replies_is_invalid_argument(keyed_node):
    """Forward reads its requests in one task and sends replies from another. A corrupt message used to be
    refused from the reading task while a reply was being written: gRPC's core refused the second operation
    (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), the caller got INTERNAL ("Internal error from Core") or a hang
    until its deadline, and the node logged a traceback. Now: INVALID_ARGUMENT every time, no traceback."""
    nodes, key = keyed_node
    refused = pb.ForwardMessage(session_id="n" * 128, plan_id=7).SerializeToString()  # an error reply each

    async def one(ch, n: int) -> grpc.StatusCode:
        call = ch.stream_stream(FORWARD)(timeout=10)
        try:
            for _ in range(n):  # a reply (the stream's first) is being sent when the corrupt message is read
                await call.write(refused)
            await call.write(CORRUPT)
            await call.done_writing()
            async for _ in call:
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()
        finally:
            call.cancel()

    async def scenario():
        async with channel(nodes.addresses[0], key) as ch:
            codes = []
            for i in range(12):
                codes += await asyncio.gather(*(one(ch, 1 + (i + j) % 3) for j in range(8)))
            return codes

    codes = asyncio.run(scenario())
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, codes
    log = nodes.log_tail(0, 100_000)
    assert "Traceback" not in log and "TOO_MANY_OPERATIONS" not in log, log[-3000:]
    assert nodes.procs[0].poll() is None
