"""Weight shipping without the network: the manifest, the slice cache (verification, LRU under a limit, pins)
and SliceCheckpoint, whose stages must be bit-identical to those loaded from the GGUF file itself."""

from __future__ import annotations

import shutil

import pytest
import torch

from edgeshard.node.model.config import ShardSpec
from edgeshard.node.weights.cache import CacheFullError, HashMismatchError, SliceCache, sha256_file
from edgeshard.node.weights.checkpoint import CheckpointError, open_checkpoint
from edgeshard.node.weights.loader import load_stage
from edgeshard.node.weights.slice import Manifest, build_manifest, manifest_wants, tensor_bytes


@pytest.fixture(scope="module")
def manifest(smollm2_path):
    return build_manifest(smollm2_path, "smollm2-135m")


def _fill(cache: SliceCache, path, manifest: Manifest, hashes) -> None:
    """Admit tensors as ShipSlice does: write a partial file, then verify and move it in."""
    from edgeshard.node.weights.gguf_file import GGUFFile

    reader = GGUFFile(path)
    where = {t.name: t for t in reader.tensors}
    by_hash = {t.sha256: t for t in manifest.tensors}
    for sha in hashes:
        t = where[by_hash[sha].name]
        part = cache.begin(sha)
        part.write_bytes(reader._buf[t.data_offset : t.data_offset + t.n_bytes])
        cache.admit(sha, part, by_hash[sha].nbytes)


def test_manifest_hashes_the_raw_bytes_and_survives_the_wire(smollm2_path, manifest):
    t = manifest.tensor("blk.3.attn_q.weight")
    import hashlib

    assert hashlib.sha256(tensor_bytes(smollm2_path, t.name)).hexdigest() == t.sha256
    again = Manifest.from_pb(manifest.to_pb())
    assert again.id == manifest.id and again.tensors == manifest.tensors
    assert Manifest.from_json(manifest.to_json()).id == manifest.id
    bad = manifest.to_pb()
    bad.tensors[0].sha256 = "0" * 64  # contents no longer match the id
    with pytest.raises(CheckpointError, match="does not match"):
        Manifest.from_pb(bad)
    assert "tokenizer.ggml.tokens" not in manifest.metadata  # nodes never tokenize
    assert manifest.metadata["llama.vocab_size"] == 49152


def test_stage_tensors_are_exactly_the_stage(manifest):
    first, middle, last = (
        manifest.stage_tensors(ShardSpec(a, b, 30)) for a, b in ((0, 10), (10, 20), (20, 30))
    )
    assert {t.name for t in middle} == {f"blk.{i}.{p}" for i in range(10, 20) for p in _parts()}
    assert "token_embd.weight" in {t.name for t in first}
    # SmolLM2 ties its head to the embedding: the last stage needs the embedding's bytes too
    assert {"output_norm.weight", "token_embd.weight"} <= {t.name for t in last}
    all_names = {t.name for s in (first, middle, last) for t in s}
    assert all_names == {t.name for t in manifest.tensors}


def _parts():
    return [
        f"{n}.weight"
        for n in (
            "attn_norm",
            "ffn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    ]


@pytest.mark.parametrize("layers", [(0, 2), (28, 30)])
def test_slice_checkpoint_loads_the_same_stage_as_the_file(tmp_path, smollm2_path, manifest, layers):
    spec = ShardSpec(*layers, 30)
    cache = SliceCache(tmp_path)
    _fill(cache, smollm2_path, manifest, manifest_wants(manifest, spec))
    from_slice = load_stage(cache.open_slice(manifest), spec, "int4")
    from_file = load_stage(open_checkpoint(smollm2_path), spec, "int4")
    a, b = from_slice.state_dict(), from_file.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a stage the cache does not hold fails by name, not with garbage
    with pytest.raises(CheckpointError, match="not in this node's slice cache"):
        load_stage(cache.open_slice(manifest), ShardSpec(10, 20, 30), "int4")


def test_cache_verifies_and_drops_corrupt_tensors(tmp_path, smollm2_path, manifest):
    want = manifest_wants(manifest, ShardSpec(10, 12, 30))
    cache = SliceCache(tmp_path)
    _fill(cache, smollm2_path, manifest, want)
    assert sorted(cache.have(want)) == sorted(want)
    victim = cache.path(want[3])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    held = SliceCache(tmp_path).have(want)  # a restarted node re-reads its index
    assert want[3] not in held and len(held) == len(want) - 1
    assert not victim.exists()
    part = cache.begin(want[3])
    part.write_bytes(bytes(data))  # wrong bytes arriving over the wire are refused too
    with pytest.raises(HashMismatchError):
        cache.admit(want[3], part, len(data))
    assert not part.exists() and not victim.exists()


def test_lru_eviction_under_the_limit_spares_pinned_tensors(tmp_path, smollm2_path, manifest):
    a = manifest_wants(manifest, ShardSpec(10, 11, 30))
    b = manifest_wants(manifest, ShardSpec(11, 12, 30))
    c = manifest_wants(manifest, ShardSpec(12, 13, 30))
    size = {t.sha256: t.nbytes for t in manifest.tensors}
    layer = sum(size[s] for s in a)
    cache = SliceCache(tmp_path, limit=2 * layer + layer // 10)
    cache.save_manifest(manifest)
    _fill(cache, smollm2_path, manifest, a)
    cache.pin("loaded", a)
    _fill(cache, smollm2_path, manifest, b)
    _fill(cache, smollm2_path, manifest, c)  # over the limit: b goes (least recently used), a is pinned
    assert cache.total_bytes <= cache.limit
    assert sorted(cache.have(a)) == sorted(a)
    assert sorted(cache.have(c)) == sorted(c)
    assert len(cache.have(b)) < len(b)
    cache.pin("incoming", c)
    with pytest.raises(CacheFullError, match="cache-limit"):
        _fill(cache, smollm2_path, manifest, b)  # nothing left to evict
    rows = cache.listing()
    assert rows[0]["model"] == "smollm2-135m" and rows[0]["bytes"] == cache.total_bytes


def test_models_list_shows_the_slices_a_node_holds(tmp_path, smollm2_path, manifest, capsys):
    import json

    from edgeshard.coordinator.cli.main import main

    cache = SliceCache(tmp_path)
    cache.save_manifest(manifest)
    _fill(cache, smollm2_path, manifest, manifest_wants(manifest, ShardSpec(10, 20, 30)))
    assert main(["models", "list", "--json", "--model-dir", str(tmp_path)]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r.get("slice")]
    assert len(rows) == 1
    assert rows[0]["layers"] == "10-19" and rows[0]["model"] == "smollm2-135m"
    assert rows[0]["bytes"] == cache.total_bytes < rows[0]["model_bytes"] / 3
    assert main(["models", "list", "--model-dir", str(tmp_path)]) == 0
    assert "10-19" in capsys.readouterr().out


def test_a_copied_cache_is_reused_and_checked(tmp_path, smollm2_path, manifest):
    """Objects without an index record (index lost, directory copied) are hashed before they count."""
    want = manifest_wants(manifest, ShardSpec(5, 6, 30))
    cache = SliceCache(tmp_path / "a")
    _fill(cache, smollm2_path, manifest, want)
    shutil.copytree(cache.objects, tmp_path / "b" / ".edgeshard-slices" / "objects")
    other = SliceCache(tmp_path / "b")
    assert sorted(other.have(want)) == sorted(want)
    assert all(sha256_file(other.path(s)) == s for s in want)


def test_a_partly_received_tensor_resumes_with_its_prefix_hashed_again(tmp_path, smollm2_path, manifest):
    """What a broken stream leaves (a partial file) survives a restart of the cache; `resume` cuts it back to
    the offset the next stream starts at and hands over a SHA-256 of the bytes held, so the tensor's hash is
    checked over all of it: a damaged prefix fails admission."""
    import hashlib

    from edgeshard.node.weights.gguf_file import GGUFFile

    entry = max(manifest.tensors, key=lambda t: t.nbytes)
    info = {t.name: t for t in GGUFFile(smollm2_path).tensors}[entry.name]
    data = bytes(GGUFFile(smollm2_path)._buf[info.data_offset : info.data_offset + info.n_bytes])
    cache = SliceCache(tmp_path)
    cache.begin(entry.sha256).write_bytes(data[:300_000])
    cache = SliceCache(tmp_path)  # a restarted node keeps what arrived
    assert cache.partial_bytes([entry.sha256, "0" * 64]) == {entry.sha256: 300_000}
    with pytest.raises(ValueError, match="fewer are held"):
        cache.resume(entry.sha256, 300_001)
    part, digest = cache.resume(entry.sha256, 200_000)  # the next stream starts at byte 200000
    assert part.stat().st_size == 200_000 and digest.hexdigest() == hashlib.sha256(data[:200_000]).hexdigest()
    with open(part, "ab") as f:
        f.write(data[200_000:])
    digest.update(data[200_000:])
    cache.admit(entry.sha256, part, entry.nbytes, digest.hexdigest())
    assert cache.have([entry.sha256]) == [entry.sha256] and not cache.partial_bytes([entry.sha256])

    other = sorted(manifest.tensors, key=lambda t: t.nbytes)[-2]
    info = {t.name: t for t in GGUFFile(smollm2_path).tensors}[other.name]
    data = bytearray(GGUFFile(smollm2_path)._buf[info.data_offset : info.data_offset + info.n_bytes])
    data[10] ^= 1  # damaged on disk before the break
    cache.begin(other.sha256).write_bytes(bytes(data[:100_000]))
    part, digest = cache.resume(other.sha256, 100_000)
    with open(part, "ab") as f:
        f.write(bytes(data[100_000:]))
    digest.update(bytes(data[100_000:]))
    with pytest.raises(HashMismatchError):
        cache.admit(other.sha256, part, other.nbytes, digest.hexdigest())
    assert not cache.partial_bytes([other.sha256])  # dropped: it is sent again from byte 0


def test_a_node_reads_tensors_from_its_model_file_for_another_node(tmp_path, smollm2_path, manifest):
    """ReadSlice's source side: tensors a node holds only in its model file (not in its cache) stream from
    that file by name, each from the requested offset; the bytes hash to the manifest's SHA-256."""
    import asyncio
    import hashlib
    import os

    from edgeshard.node.service.slices import read_slice
    from edgeshard.node.wire import edgeshard_pb2 as pb

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    try:
        os.link(smollm2_path, model_dir / smollm2_path.name)
    except OSError:
        shutil.copy(smollm2_path, model_dir / smollm2_path.name)
    m = build_manifest(model_dir / smollm2_path.name, smollm2_path.name)
    cache = SliceCache(model_dir)
    cache.save_manifest(m)
    picks = sorted(m.tensors, key=lambda t: t.nbytes)[-2:]

    async def read(offsets):
        req = pb.ReadSliceRequest(
            manifest_id=m.id, tensors=[pb.ShipPartial(sha256=t.sha256, bytes=o) for t, o in offsets]
        )
        return [c async for c in read_slice(cache, req, model_dir)]

    chunks = asyncio.run(read([(picks[0], 0), (picks[1], 1_000_000)]))
    got = {t.sha256: b"" for t in picks}
    for c in chunks:
        got[c.sha256] += c.data
    assert hashlib.sha256(got[picks[0].sha256]).hexdigest() == picks[0].sha256
    full = tensor_bytes(model_dir / smollm2_path.name, picks[1].name)
    assert got[picks[1].sha256] == bytes(full[1_000_000:])
    assert chunks[-1].last and chunks[-1].offset + len(chunks[-1].data) == picks[1].nbytes
