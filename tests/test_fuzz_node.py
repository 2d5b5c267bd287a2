"""Fuzzing a real node (hypothesis) over its gRPC API on 127.0.0.1, as a member holding the cluster key: the
worst case, past TLS and the token check. LoadShard with random and trap paths (traversal, symlinks out of the
model directory, loops, a sharded index naming files outside), Forward with random payloads, shapes, dtypes,
bytes, session ids and positions, Health and Results with random sizes. Every input must get a typed status
(never INTERNAL/UNKNOWN, never a hang), the node must not log a traceback, and afterwards it must still make
the same greedy generation as before. Counts are printed at the end of each target."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.security.channels import ClusterKey, channel
from edgeshard.node.service.shard_load import _HOST_PORT
from edgeshard.node.weights.model_dir import resolve_in_model_dir
from edgeshard.node.weights.registry import REGISTRY
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.tensors import status_code

pytestmark = pytest.mark.slow
S = grpc.StatusCode
PROMPT = [1, 504, 3458, 282, 4649, 314, 8411, 30]
D, VOCAB, LAYERS = 576, 49152, 30  # SmolLM2-135M
TYPED = {S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
COUNTS: dict[str, int] = {}


class LoopThread:
    """An event loop in a thread: hypothesis drives synchronous examples, gRPC channels live in this loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout: float = 60.0):
        """Run `coro` in the loop; a hang is a TimeoutError (the test fails instead of waiting forever)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def _model_dir(root, smollm2_path):
    """A model directory full of traps, with the real model as model.gguf (a hard link when possible)."""
    models = root / "models"
    models.mkdir()
    try:
        os.link(smollm2_path, models / "model.gguf")
    except OSError:
        shutil.copy(smollm2_path, models / "model.gguf")
    secret = root / "secret.gguf"
    secret.write_bytes(b"GGUF" + b"\0" * 64)
    (root / "secret.safetensors").write_bytes(b"\0" * 64)
    os.symlink(secret, models / "outside.gguf")
    os.symlink(root, models / "escape")
    os.symlink(models / "loop", models / "loop")
    os.symlink("ab", models / "ba")
    os.symlink("ba", models / "ab")  # a two-link loop
    for name, index in (("hf", "../secret.safetensors"), ("hf_abs", str(root / "secret.safetensors"))):
        (models / name).mkdir()
        (models / name / "config.json").write_text("{}")
        (models / name / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": index}}))
    (models / "hf_link").mkdir()
    os.symlink(root / "secret.safetensors", models / "hf_link" / "model.safetensors")
    (models / "empty.gguf").write_bytes(b"")
    (models / "garbage.gguf").write_bytes(os.urandom(4096))
    (models / "dir.gguf").mkdir()
    return models


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory, smollm2_path):
    """One keyed node over the trap directory, a loop thread, a member channel, and the reference tokens."""
    models = _model_dir(tmp_path_factory.mktemp("fuzz"), smollm2_path)
    key = ClusterKey.generate()
    loop = LoopThread()
    with LocalNodes(1, model_dir=models, name="fuzz", max_sessions=8, security=key) as cluster:
        ch = loop.run(_open_channel(cluster.addresses[0], key))
        node = FuzzNode(cluster, key, loop, pb_grpc.NodeStub(ch))
        node.models, node.model_file = models, (models / "model.gguf").resolve()
        node.reference = node.greedy()
        yield node
        loop.run(ch.close())
        print_counts()
    loop.close()


async def _open_channel(address: str, key: ClusterKey):
    return channel(address, key)


class FuzzNode:
    """The node under fuzzing and what the targets need of it."""

    def __init__(self, cluster: LocalNodes, key: ClusterKey, loop: LoopThread, stub) -> None:
        self.cluster, self.key, self.loop, self.stub = cluster, key, loop, stub
        self.address = cluster.addresses[0]
        self.reference: list[int] = []

    def load(self, start: int, plan_id: int) -> None:
        """Load model.gguf layers [start, 30) as the last stage (fails the test if the node refuses)."""
        req = pb.LoadShardRequest(
            model="model.gguf", start_layer=start, end_layer=LAYERS, plan_id=plan_id, next_hop="last"
        )
        self.loop.run(_load_call(self.stub, req), 120)

    def greedy(self) -> list[int]:
        """12 greedy tokens of PROMPT with every layer on this node (reloads the whole model)."""

        async def run() -> list[int]:
            d = await deploy([self.address], "model.gguf", LAYERS, security=self.key)
            pipe = await d.pipeline()
            try:
                return [t async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), 12))]
            finally:
                await pipe.aclose()
                await d.close()

        return self.loop.run(run(), 180)

    def assert_healthy(self) -> None:
        """Still running, no traceback in its log, and the same generation as before the fuzzing."""
        assert self.cluster.procs[0].poll() is None, self.cluster.log_tail(0, 80)
        assert self.greedy() == self.reference
        log = self.cluster.log_tail(0, 100_000)
        assert "Traceback" not in log and "failed the step" not in log, log[-4000:]


async def _info(stub) -> pb.NodeInfo:
    return await stub.GetInfo(pb.GetInfoRequest(), timeout=30)


async def _load_call(stub, req: pb.LoadShardRequest) -> list[pb.LoadProgress]:
    # the call is made here, in the loop thread: grpc.aio calls belong to the loop that creates them
    return [m async for m in stub.LoadShard(req)]


def _count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


def print_counts() -> None:
    """The number of inputs each target tried (shown with -s, and in the junit properties)."""
    print("\nnode fuzz: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


# ---------------------------------------------------------------------------------------------- LoadShard
TRAPS = [
    "model.gguf", "./model.gguf", "outside.gguf", "escape/secret.gguf", "escape/../secret.gguf", "../secret.gguf",
    "loop", "loop/x", "ab", "ba/model.gguf", "hf", "hf_abs", "hf_link", "empty.gguf", "garbage.gguf", "dir.gguf",
    "/etc/passwd", "~/.ssh/id_rsa", "C:\\Windows", "..\\secret.gguf", "model.gguf\x00.txt", "", " ", ".", "..",
    "sub/../../secret.gguf", "%2e%2e/secret.gguf", "model.gguf/", "a" * 300, "x/" * 600,
]  # fmt: skip
_ref = (
    st.sampled_from(TRAPS)
    | st.text(max_size=80)
    | st.lists(st.sampled_from(TRAPS + ["..", "."]), max_size=4).map("/".join)
)
_hop = st.sampled_from(["last", "127.0.0.1:1", "[::1]:9", "", "bogus", "127.0.0.1:99999"]) | st.text(
    max_size=30
).filter(lambda s: s != "last" and not _HOST_PORT.match(s))  # never a real address off this machine
_load = st.builds(
    pb.LoadShardRequest,
    model=_ref.filter(lambda r: r not in REGISTRY),  # a registry name would pull from the internet
    start_layer=st.integers(0, 40),
    end_layer=st.integers(0, 40),
    quant=st.sampled_from(["", "int4", "int8", "bf16", "f32", "q4", "INT4"]) | st.text(max_size=6),
    plan_id=st.integers(0, 2**64 - 1),
    next_hop=_hop,
    num_layers=st.sampled_from([0, 30, 31]) | st.integers(0, 2**32 - 1),
)


def test_load_shard_fuzz(fuzz_node):
    @FUZZ
    @given(req=_load)
    def one(req: pb.LoadShardRequest) -> None:
        _count("LoadShard")
        try:
            progress = fuzz_node.loop.run(_load_call(fuzz_node.stub, req), 120)
        except grpc.aio.AioRpcError as e:
            assert e.code() in TYPED and e.details(), (e.code(), e.details(), req)
            return
        # accepted: only the real model, named by a path that stays inside the directory
        assert progress[-1].done and progress[-1].shard.num_layers == LAYERS, req
        assert resolve_in_model_dir(req.model, fuzz_node.models, pull=False) == fuzz_node.model_file, req

    one()
    fuzz_node.assert_healthy()


# ---------------------------------------------------------------------------------------------- Forward
_floats = st.binary(max_size=64) | st.sampled_from([b"\x00\x7f\xc0\x7f" * 4, b"\x80\x7f" * 8, b"\xff" * 16])
_shape = st.lists(st.sampled_from([0, 1, 2, 3, 8, D, D + 1, 2049, 2**40, 2**64 - 1]), max_size=3)


@st.composite
def _tensor(draw) -> pb.Tensor:
    dtype = draw(st.sampled_from([pb.DTYPE_BF16, pb.DTYPE_F16, pb.DTYPE_F32, 0, 4, 99]))
    if draw(st.booleans()):  # a well-formed tensor with random values (NaN and inf included)
        rows = draw(st.integers(1, 4))
        size = {pb.DTYPE_F32: 4}.get(dtype, 2)
        data = draw(_floats) * (rows * D * size)
        return pb.Tensor(
            dtype=dtype, shape=[rows, D], data=data[: rows * D * size].ljust(rows * D * size, b"\1")
        )
    return pb.Tensor(dtype=dtype, shape=draw(_shape), data=draw(st.binary(max_size=4096)))


_sampling = st.builds(
    pb.SamplingParams,
    temperature=st.floats(allow_nan=True) | st.sampled_from([0.0, 1e-38, 1e-45, 0.7]),
    top_p=st.floats(allow_nan=True),
    top_k=st.integers(0, 2**32 - 1),
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
)
_session = st.sampled_from(["s0", "s1", "s2"]) | st.text(max_size=20) | st.just("x" * 200)


@st.composite
def _message(draw, plan_id: int) -> pb.ForwardMessage:
    msg = pb.ForwardMessage(
        plan_id=draw(st.sampled_from([plan_id, plan_id, plan_id + 1, 0])),
        session_id=draw(_session),
        start=draw(st.integers(0, 12) | st.integers(0, 2**64 - 1)),
        sample=draw(st.booleans()),
        sent_at_us=draw(st.integers(0, 2**64 - 1)),
    )
    which = draw(st.sampled_from(["tokens", "hidden", "hidden", "open", "open", "end", "error", "none"]))
    if which == "tokens":
        msg.tokens.ids.extend(
            draw(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, VOCAB), max_size=12))
        )
    elif which == "hidden":
        msg.hidden.CopyFrom(draw(_tensor()))
    elif which == "open":
        msg.open.CopyFrom(
            pb.OpenSession(
                sampling=draw(_sampling),
                reply_to=draw(st.text(max_size=10) | st.just("r" * 300)),
                max_len=draw(st.integers(0, 2**32 - 1) | st.integers(0, 9000)),
            )
        )
    elif which == "end":
        msg.end.CopyFrom(pb.EndSession())
    elif which == "error":
        msg.error.CopyFrom(
            pb.Error(code=draw(st.integers(-(2**31), 2**31 - 1)), message=draw(st.text(max_size=20)))
        )
    return msg


@st.composite
def _script(draw, plan_id: int, first: bool) -> list[pb.ForwardMessage]:
    """A session opened properly, then a step of the right kind and shape (random values: NaN, inf, huge),
    then random messages: reaches the compute and the sampler, not only the validation."""
    params = pb.SamplingParams(
        temperature=draw(st.sampled_from([0.0, 1e-38, 0.7, 1.5])),
        top_p=draw(st.sampled_from([0.0, 0.5, 1.0])),
    )
    opened = pb.ForwardMessage(plan_id=plan_id, session_id="s0", open=pb.OpenSession(sampling=params))
    step = pb.ForwardMessage(plan_id=plan_id, session_id="s0", start=0, sample=draw(st.booleans()))
    if first:
        step.tokens.ids.extend(draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)))
    else:
        rows = draw(st.integers(1, 4))
        pattern = draw(_floats.filter(len))
        step.hidden.CopyFrom(
            pb.Tensor(dtype=pb.DTYPE_BF16, shape=[rows, D], data=(pattern * rows * D)[: rows * D * 2])
        )
    return [opened, step, *draw(st.lists(_message(plan_id), max_size=2))]


async def _exchange(stub, msgs: list[pb.ForwardMessage]) -> list[pb.ForwardReply]:
    """Write `msgs` and a sentinel that is always refused; the replies up to the sentinel's (the node handles a
    stream in order, so every message before it has been dealt with)."""
    call = stub.Forward()
    for m in msgs:
        await call.write(m)
    await call.write(pb.ForwardMessage(session_id="sentinel"))  # no payload: refused
    replies = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        if reply.session_id == "sentinel":
            break
        replies.append(reply)
    await call.done_writing()
    return replies


@pytest.mark.parametrize("stage", ["first", "later"])
def test_forward_fuzz(fuzz_node, stage):
    plan_id = 4242 if stage == "first" else 4343
    fuzz_node.load(0 if stage == "first" else 15, plan_id)  # tokens in / hidden states in

    @FUZZ
    @given(msgs=st.lists(_message(plan_id), min_size=1, max_size=4) | _script(plan_id, stage == "first"))
    def one(msgs: list[pb.ForwardMessage]) -> None:
        _count(f"Forward({stage})")
        replies = fuzz_node.loop.run(_exchange(fuzz_node.stub, msgs), 60)
        for r in replies:
            code = status_code(r.error.code)
            assert code in TYPED and r.error.message, (code, r.error.message, msgs)

    one()
    stats = fuzz_node.loop.run(_info(fuzz_node.stub)).stats
    COUNTS[f"Forward({stage}) steps computed"] = stats.steps
    fuzz_node.assert_healthy()


# ---------------------------------------------------------------------------------------------- Health, Results
def test_health_and_results_fuzz(fuzz_node):
    @FUZZ
    @given(
        reply_bytes=st.integers(0, 2**32 - 1),
        payload=st.binary(max_size=1 << 16),
        subscriber=st.text(max_size=40) | st.just("n" * 129),
        plan_id=st.integers(0, 2**64 - 1),
    )
    def one(reply_bytes: int, payload: bytes, subscriber: str, plan_id: int) -> None:
        _count("Health+Results")

        async def health():
            return await fuzz_node.stub.Health(
                pb.HealthRequest(reply_bytes=reply_bytes, payload=payload), timeout=30
            )

        reply = fuzz_node.loop.run(health())
        assert reply.ok and len(reply.payload) == min(reply_bytes, 4 << 20)

        async def subscribe():
            call = fuzz_node.stub.Results(pb.ResultsRequest(subscriber=subscriber, plan_id=plan_id))
            try:
                return await call.read()
            finally:
                call.cancel()

        try:
            first = fuzz_node.loop.run(subscribe(), 30)
        except grpc.aio.AioRpcError as e:
            assert e.code() == S.INVALID_ARGUMENT and len(subscriber) > 128, (e.code(), e.details())
            return
        assert first.kind == pb.RESULT_READY

    one()
    fuzz_node.assert_healthy()
