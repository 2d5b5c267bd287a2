"""Weight shipping end to end: node processes with empty model directories get their stage's tensors from the
coordinator, generate exactly what --local does, keep only their slice, reload it with nothing shipped,
detect a corrupted tensor by its hash, resume a broken stream, and refuse a share that their
--memory-limit cannot hold. Failure recovery ships the lost stage to a spare that has no copy."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from edgeshard.coordinator.errors import CapacityError
from edgeshard.coordinator.pipeline import ship
from edgeshard.coordinator.pipeline.deploy import deploy, transfers
from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline, Sequence, generate
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.lowbit import native
from edgeshard.node.model.config import ShardSpec, even_split
from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.cache import CACHE_DIRNAME
from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.loader import load_stage
from edgeshard.node.weights.slice import build_manifest, manifest_wants

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

MAX_TOKENS = 24
QUANT = "f32"  # f32 splits are bit-identical to one stage (see tests/test_pipeline.py)
PROMPT = [1, 504, 3458, 282, 4649, 314]  # "The capital of France is" in SmolLM2's vocabulary, roughly
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def aio():
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(scope="module")
def local_tokens(smollm2_path):
    ckpt = open_checkpoint(smollm2_path)
    stage = load_stage(ckpt, ShardSpec.full(30), QUANT)
    pipe = AsyncLocalPipeline(LocalPipeline([ShardExecutor(stage)]))

    async def run():
        return [t async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), MAX_TOKENS))]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def manifest(smollm2_path):
    return build_manifest(smollm2_path, MODEL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes, each with its own empty model directory."""
    dirs = [tmp_path_factory.mktemp(f"empty{i}") for i in range(3)]
    with LocalNodes(3, model_dirs=dirs, name="ship", node_args=["--no-benchmark"]) as c:
        c.dirs = dirs
        yield c


def objects(model_dir) -> set[str]:
    return {p.name for p in (model_dir / CACHE_DIRNAME / "objects").iterdir()}


def dir_bytes(model_dir) -> int:
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())


async def tokens_of(addresses, path) -> tuple[list[int], list[dict]]:
    d = await deploy(addresses, MODEL, 30, QUANT, source=path)
    try:
        pipe = await d.pipeline()
        try:
            got = [t async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), MAX_TOKENS))]
        finally:
            await pipe.aclose()
        return got, d.plan
    finally:
        await d.close()


def test_empty_nodes_get_their_slice_and_match_local(aio, cluster, smollm2_path, manifest, local_tokens):
    got, plan = aio(tokens_of(cluster.addresses, smollm2_path))
    assert got == local_tokens
    size = smollm2_path.stat().st_size
    for entry, model_dir, spec in zip(plan, cluster.dirs, even_split(30, 3), strict=True):
        want = set(manifest_wants(manifest, spec))
        assert objects(model_dir) == want  # exactly its stage's tensors, nothing else
        shipped = sum({t.sha256: t.nbytes for t in manifest.tensors if t.sha256 in want}.values())
        assert entry["shipped_bytes"] == shipped
        assert entry["weight_bytes"] > 0
        assert dir_bytes(model_dir) < 0.6 * size  # well under the whole file (the ends hold the embedding)
    assert sum(objects(d).__len__() for d in cluster.dirs) >= len(manifest.tensors)
    live = transfers()  # what /v1/cluster reports per node (coordinator/serving/assemble.py)
    for entry in plan:
        t = live[entry["address"]]
        assert t["phase"] == "ready" and t["shipped_bytes"] == entry["shipped_bytes"] > 0
        assert t["bytes_done"] == t["bytes_total"] == entry["shipped_bytes"] and t["bytes_per_s"] > 0


def test_restarted_node_loads_with_nothing_shipped(aio, cluster, smollm2_path, local_tokens):
    aio(tokens_of(cluster.addresses, smollm2_path))  # the slices are there (whatever ran before)
    os.kill(cluster.procs[1].pid, signal.SIGKILL)
    cluster.procs[1].wait()
    cluster.restart(1)
    got, plan = aio(tokens_of(cluster.addresses, smollm2_path))
    assert got == local_tokens
    assert [e["shipped_bytes"] for e in plan] == [0, 0, 0]


def test_corrupted_cached_tensor_is_dropped_and_shipped_again(
    aio, cluster, smollm2_path, manifest, local_tokens
):
    aio(tokens_of(cluster.addresses, smollm2_path))
    spec = even_split(30, 3)[2]
    by_hash = {t.sha256: t for t in manifest.tensors}
    victim = max(manifest_wants(manifest, spec), key=lambda s: by_hash[s].nbytes)
    path = cluster.dirs[2] / CACHE_DIRNAME / "objects" / victim
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x40
    path.write_bytes(bytes(data))
    os.kill(cluster.procs[2].pid, signal.SIGKILL)  # a restart makes it load from the cache again
    cluster.procs[2].wait()
    cluster.restart(2)
    got, plan = aio(tokens_of(cluster.addresses, smollm2_path))
    assert got == local_tokens
    assert [e["shipped_bytes"] for e in plan] == [0, 0, by_hash[victim].nbytes]
    assert path.read_bytes() != bytes(data)


def test_broken_stream_resumes_and_corrupt_chunks_are_sent_again(
    aio, cluster, smollm2_path, manifest, local_tokens
):
    spec = even_split(30, 3)[1]
    want = manifest_wants(manifest, spec)
    by_hash = {t.sha256: t for t in manifest.tensors}
    needed = sum(by_hash[s].nbytes for s in want)
    os.kill(cluster.procs[1].pid, signal.SIGKILL)
    cluster.procs[1].wait()
    for p in (cluster.dirs[1] / CACHE_DIRNAME / "objects").iterdir():
        p.unlink()
    cluster.restart(1)
    ship.cut_next_stream_after = 12  # the first stream breaks after 12 chunks
    ship.corrupt_once = {want[-1]}  # and one tensor arrives with a flipped byte
    try:
        got, plan = aio(tokens_of(cluster.addresses, smollm2_path))
    finally:
        ship.cut_next_stream_after, ship.corrupt_once = None, None
    assert got == local_tokens
    assert objects(cluster.dirs[1]) == set(want)
    shipped = plan[1]["shipped_bytes"]
    # what arrived before the cut is not sent again: at most the tensor in flight and the corrupted one repeat
    largest = max(by_hash[s].nbytes for s in want)
    assert needed < shipped <= needed + 2 * largest


def _cut_inside_a_tensor(manifest, want: list[str], chunk: int) -> tuple[int, str, int]:
    """(chunks to send before the cut, the tensor it cuts, bytes of it sent): the first cut that falls strictly
    inside a tensor when `want` streams in chunks of `chunk` bytes."""
    by_hash = {t.sha256: t for t in manifest.tensors}
    n = 0
    for sha in want:
        size = by_hash[sha].nbytes
        if size > 2 * chunk:
            return n + 2, sha, 2 * chunk  # two chunks of this tensor arrive, then the link breaks
        n += max(1, -(-size // chunk))
    raise AssertionError("no tensor spans three chunks")


def _cut_for_node_1(cluster, manifest, monkeypatch):
    """Node 1 (the middle stage of 3) emptied and shipping set to 64 KB chunks: (the stage's tensors, the
    manifest's tensors by hash, their bytes, chunks before a cut inside a tensor, that tensor, bytes of it
    sent before the cut, its part file on the node)."""
    want = manifest_wants(manifest, even_split(30, 3)[1])
    by_hash = {t.sha256: t for t in manifest.tensors}
    needed = sum(by_hash[s].nbytes for s in want)
    _empty_node(cluster, 1)
    monkeypatch.setattr(ship, "CHUNK_BYTES", 64 << 10)
    cut, victim, sent = _cut_inside_a_tensor(manifest, want, 64 << 10)
    partial = cluster.dirs[1] / CACHE_DIRNAME / "partial" / f"{victim}.part"
    return want, by_hash, needed, cut, victim, sent, partial


def _empty_node(cluster, i: int) -> None:
    os.kill(cluster.procs[i].pid, signal.SIGKILL)
    cluster.procs[i].wait()
    for p in (cluster.dirs[i] / CACHE_DIRNAME / "objects").iterdir():
        p.unlink()
    cluster.restart(i)


def test_stream_broken_inside_a_tensor_resumes_at_that_byte(
    aio, cluster, smollm2_path, manifest, local_tokens, monkeypatch
):
    """The link breaks two chunks into a tensor: the next stream starts that tensor at the byte where it
    stopped, so not one byte is sent twice, and the loaded stage generates what --local does."""
    want, by_hash, needed, cut, victim, sent, partial = _cut_for_node_1(cluster, manifest, monkeypatch)
    seen = []
    monkeypatch.setattr(ship, "after_cut", lambda: seen.append(partial.stat().st_size))
    ship.cut_next_stream_after = cut
    try:
        d = aio(deploy(cluster.addresses, MODEL, 30, QUANT, source=smollm2_path))
    finally:
        ship.cut_next_stream_after = None
    try:
        report = d.shipped[1]
        assert seen == [sent]  # the node kept the two chunks of the tensor in flight
        assert report.resumed_bytes == sent and report.rejected == 0
        assert report.shipped_bytes == needed  # nothing sent twice
        assert objects(cluster.dirs[1]) == set(want) and not partial.exists()
    finally:
        aio(d.close())
    got, plan = aio(tokens_of(cluster.addresses, smollm2_path))
    assert got == local_tokens and plan[1]["shipped_bytes"] == 0


def test_resumed_tensor_is_still_checked_whole(
    aio, cluster, smollm2_path, manifest, local_tokens, monkeypatch
):
    """A byte of the part received before the break is flipped on the node's disk: the resumed tensor fails
    its SHA-256 (checked over all of its bytes, not only the resumed ones), is dropped and sent again whole."""
    want, by_hash, needed, cut, victim, sent, partial = _cut_for_node_1(cluster, manifest, monkeypatch)

    def flip() -> None:
        data = bytearray(partial.read_bytes())
        data[100] ^= 0x01
        partial.write_bytes(bytes(data))

    monkeypatch.setattr(ship, "after_cut", flip)
    ship.cut_next_stream_after = cut
    try:
        got, plan = aio(tokens_of(cluster.addresses, smollm2_path))
    finally:
        ship.cut_next_stream_after = None
    assert got == local_tokens
    assert objects(cluster.dirs[1]) == set(want)
    # resumed (sent bytes after the first `sent`), rejected whole, then sent again from byte 0
    assert plan[1]["shipped_bytes"] == needed + by_hash[victim].nbytes


def test_spare_pulls_its_slice_from_the_node_that_holds_it(
    aio, tmp_path, smollm2_path, manifest, local_tokens
):
    """Node-to-node shipping: a spare with an empty dir gets the first stage's tensors from the node that held
    that stage (PullSlice -> ReadSlice), with no copy of the file at the coordinator (path None); then the
    plan [spare, second] loads with nothing shipped and generates what --local does."""
    from edgeshard.coordinator.pipeline.stage_client import connect

    dirs = [tmp_path / n for n in ("first", "second", "spare")]
    for d in dirs:
        d.mkdir()
    with LocalNodes(3, model_dirs=dirs, name="peer", node_args=["--no-benchmark"]) as c:
        first, second, spare = c.addresses
        d = aio(deploy([first, second], MODEL, 30, QUANT, source=smollm2_path))
        aio(d.close())
        spec = even_split(30, 2)[0]
        want = manifest_wants(manifest, spec)
        by_hash = {t.sha256: t for t in manifest.tensors}

        async def pull():
            clients, _ = await connect([spare, first, second])
            try:
                return await ship.ship_stage(clients[0], MODEL, manifest, None, spec, peers=clients[1:])
            finally:
                await asyncio.gather(*(x.close() for x in clients))

        report = aio(pull())
        assert report.shipped_bytes == report.from_peers_bytes == sum(by_hash[s].nbytes for s in want)
        assert report.peers == (first,)
        assert objects(dirs[2]) == set(want)
        got, plan = aio(tokens_of([spare, second], smollm2_path))
        assert got == local_tokens
        assert [e["shipped_bytes"] for e in plan] == [0, 0]

        # a tensor nobody holds, and no file at the coordinator: one clear error
        spec_last = even_split(30, 3)[2]
        for p in (dirs[2] / CACHE_DIRNAME / "objects").iterdir():
            p.unlink()

        async def nobody():
            clients, _ = await connect([spare])
            try:
                await ship.ship_stage(clients[0], MODEL, manifest, None, spec_last, peers=())
            finally:
                await clients[0].close()

        with pytest.raises(Exception, match="no other node holds"):
            aio(nobody())


def test_memory_limit_below_the_share_is_refused(aio, tmp_path, smollm2_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    with LocalNodes(
        2, model_dirs=dirs, name="tight", node_args=["--no-benchmark", "--memory-limit", "30M"]
    ) as c:
        with pytest.raises(CapacityError, match=r"tight1 .*--memory-limit 30.* missing") as e:
            aio(deploy(c.addresses, MODEL, 30, "int4", source=smollm2_path))
        assert "layers 0-14" in str(e.value)
        assert not any(
            (d / CACHE_DIRNAME / "objects").exists() and objects(d) for d in dirs
        )  # nothing shipped


def test_recovery_ships_the_lost_stage_to_a_spare_without_a_copy(aio, tmp_path, smollm2_path, manifest):
    """Three int4 stages and a spare, all empty; a stage's node is killed mid-generation: the spare gets that
    stage's tensors and the generation ends with the tokens of an uninterrupted run."""
    from edgeshard.coordinator.recovery.resilient import RecoveryPolicy, resilient

    dirs = [tmp_path / f"n{i}" for i in range(4)]
    for d in dirs:
        d.mkdir()
    args = ["--no-benchmark", "--memory-limit", "75M"]  # a 10-layer stage fits, 15 layers do not
    with LocalNodes(4, model_dirs=dirs, name="rship", node_args=args) as c:

        async def run(kill_after: int | None):
            d = await deploy(c.addresses[:3], MODEL, 30, None, source=smollm2_path)
            # the int4 layers say what they run on: the process's own kernel set, the same on every node
            kernels = native.kernel_set() if native.available() else "torch"
            assert [list(s.kernels) for s in d.shards] == [[kernels]] * 3
            pipe = resilient(
                d,
                await d.pipeline(),
                smollm2_path,
                candidates=c.addresses,
                policy=RecoveryPolicy(retry_s=1.0),
            )
            out = []
            try:
                async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), MAX_TOKENS)):
                    out.append(t)
                    if kill_after is not None and len(out) == kill_after:
                        os.kill(c.procs[1].pid, signal.SIGKILL)
                return out, pipe.recoveries
            finally:
                await pipe.aclose()
                await d.close()

        want, _ = aio(run(None))
        assert not objects(dirs[3])  # the spare holds nothing yet
        got, recoveries = aio(run(6))
        assert got == want
        assert len(recoveries) == 1
        assert objects(dirs[3]) == set(manifest_wants(manifest, even_split(30, 3)[1]))


def test_run_peers_cli_ships_to_an_emptied_node_and_matches_run_local(cluster, smollm2_path, capsys):
    """The command line: `run --peers` over nodes whose model dirs lack the model prints the tokens
    `run --local` prints; the emptied node gets its slice again (plan entries carry shipped_bytes)."""
    import json
    import shutil

    from edgeshard.coordinator.cli.main import main

    os.kill(cluster.procs[0].pid, signal.SIGKILL)
    cluster.procs[0].wait()
    shutil.rmtree(cluster.dirs[0] / CACHE_DIRNAME)
    cluster.restart(0)
    common = ["--model", str(smollm2_path), "--prompt", "The capital of France is", "--max-tokens", "12"]
    common += ["--quant", QUANT, "--json"]
    assert main(["run", "--local", "--threads", "1", *common]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    key = ["--cluster-key-file", str(cluster.key_file)]
    assert main(["run", "--peers", ",".join(cluster.addresses), *key, *common]) == 0
    remote = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert remote["tokens"] == local["tokens"]
    assert remote["plan"][0]["shipped_bytes"] > 0 and remote["plan"][0]["weight_bytes"] > 0
    assert [p["shipped_bytes"] for p in remote["plan"][1:]] == [0, 0]
    assert not (cluster.dirs[0] / smollm2_path.name).exists()


def test_coordinator_without_the_file_ships_from_a_node_that_has_it(
    aio, tmp_path, smollm2_path, local_tokens
):
    """The coordinator has no copy: one node has the GGUF in its --model-dir, the other nothing. The holder
    describes its file (SliceManifestOf) and the empty node pulls its stage's tensors from it; the tokens
    are --local's."""
    import shutil

    dirs = [tmp_path / "holder", tmp_path / "empty"]
    for d in dirs:
        d.mkdir()
    try:
        os.link(smollm2_path, dirs[0] / smollm2_path.name)
    except OSError:
        shutil.copy(smollm2_path, dirs[0] / smollm2_path.name)
    with LocalNodes(2, model_dirs=dirs, name="nofile", node_args=["--no-benchmark"]) as c:

        async def run():
            d = await deploy(c.addresses, smollm2_path.name, 30, QUANT)  # no source=: nothing here to ship
            try:
                pipe = await d.pipeline()
                try:
                    return [
                        t async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), MAX_TOKENS))
                    ], d
                finally:
                    await pipe.aclose()
            finally:
                await d.close()

        got, d = aio(run())
        assert got == local_tokens
        holder, empty = d.plan
        assert holder["shipped_bytes"] == 0 and d.shipped[0] is None  # it loads its own file
        assert empty["shipped_bytes"] == empty["from_peers_bytes"] > 0
        assert d.shipped[1].peers == (c.addresses[0],)
        assert not (dirs[1] / smollm2_path.name).exists()
        assert objects(dirs[1])  # its slice, in its cache
        assert transfers()[c.addresses[1]]["from_peers_bytes"] == empty["from_peers_bytes"]  # /v1/cluster
