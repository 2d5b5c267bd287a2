"""What a listener on the LAN sees: a TCP relay on 127.0.0.1 records every byte between coordinator and nodes
and between the nodes; with a cluster key none of the prompt's token ids, tensors, model names or method
names are in it, with --insecure they all are (so the search itself is shown to work)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from rich.console import Console

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.security.channels import INSECURE, ClusterKey
from edgeshard.node.wire import edgeshard_pb2 as pb

pytestmark = pytest.mark.slow
PROMPT = [1, 504, 3458, 282, 4649, 314, 8411, 30]
D = 576  # SmolLM2-135M hidden size


class Relay:
    """Forwards 127.0.0.1:<port> to `target`, recording both directions of every connection."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.recorded = bytearray()
        self.first_bytes: list[bytes] = []  # the opening bytes each connecting client sent
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        first = [True]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, is_client: bool) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if is_client and first[0]:
                        self.first_bytes.append(bytes(data[:16]))
                        first[0] = False
                    self.recorded += data
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        for t in (pipe(reader, up_writer, True), pipe(up_reader, writer, False)):
            task = asyncio.ensure_future(t)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        self.server.close()


def _markers(wire_dtype: int, model: str) -> dict[str, bytes]:
    """Byte patterns that a plaintext capture of this generation must contain."""
    return {
        "token ids": pb.TokenIds(ids=PROMPT).SerializeToString(),
        # Tensor{dtype, shape (8, 576)} as serialized before its data: the prefill's hidden states
        "hidden tensor": pb.Tensor(dtype=wire_dtype, shape=[len(PROMPT), D]).SerializeToString(),
        "model name": model.encode(),  # in LoadShardRequest
        "session id": b"privacy-probe",
    }


@pytest.mark.parametrize("mode", ["key", "insecure"])
def test_node_traffic_is_opaque_with_a_key_and_plain_without(smollm2_path, mode):
    security = ClusterKey.generate() if mode == "key" else INSECURE
    with LocalNodes(2, model_dir=smollm2_path.parent, name=f"wire-{mode}", security=security) as nodes:

        async def run():
            relays = [Relay(a) for a in nodes.addresses]
            fronts = [await r.start() for r in relays]
            try:
                # the coordinator dials the relays, and node 1's next hop is relay 2: every hop is recorded
                d = await deploy(
                    fronts, smollm2_path.name, 30, console=Console(quiet=True), security=security
                )
                pipe = await d.pipeline()
                try:
                    seq = Sequence(PROMPT, SamplingParams(), 4)
                    seq.session_id = "privacy-probe"
                    tokens = [t async for t in generate(pipe, seq)]
                finally:
                    await pipe.aclose()
                    await d.close()
                return tokens, d.shards[0].wire_dtype, relays
            finally:
                for r in relays:
                    await r.close()

        tokens, wire_dtype, relays = asyncio.run(run())
    assert len(tokens) == 4
    captured = b"".join(bytes(r.recorded) for r in relays)
    assert len(relays[1].recorded) > len(PROMPT) * D * 2  # the hidden states did pass relay 2
    found = {name: m in captured for name, m in _markers(wire_dtype, smollm2_path.name).items()}
    if mode == "insecure":
        assert all(found.values()), found  # the search works: plaintext gRPC shows everything
        assert all(b.startswith(b"PRI * HTTP/2.0") for r in relays for b in r.first_bytes)
    else:
        assert not any(found.values()), found
        # every connection opened with a TLS handshake record (0x16 0x03), never the plaintext HTTP/2 preface
        assert all(b[:2] == b"\x16\x03" for r in relays for b in r.first_bytes), relays[0].first_bytes
        assert b"PRI * HTTP/2.0" not in captured and b"edgeshard.v1" not in captured
