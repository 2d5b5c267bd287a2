"""Model references are untrusted: traversal, symlinks, loops, over-long names and sharded indexes never make a
node open (or list) anything outside its model directory; every refusal is a typed WireError. An audit hook
records every file the resolver and the checkpoint reader open, for random references too (hypothesis)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.model_dir import resolve_in_model_dir
from edgeshard.node.wire.tensors import WireError

_RECORD: list[list[str]] = []  # while non-empty, the audit hook appends what is opened or listed to [-1]


def _audit(event: str, args: tuple) -> None:
    if _RECORD and event in ("open", "os.listdir", "os.scandir") and args:
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            _RECORD[-1].append(os.fsdecode(path))


sys.addaudithook(_audit)  # cannot be removed: it records only while a test fills _RECORD


@pytest.fixture(scope="module")
def trap_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("traps")
    root = base / "models"
    root.mkdir()
    (root / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (base / "secret.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (base / "secret.safetensors").write_bytes(b"\0" * 64)
    os.symlink(base / "secret.gguf", root / "outside.gguf")
    os.symlink(base, root / "escape")
    os.symlink(root / "loop", root / "loop")
    os.symlink("ab", root / "ba")
    os.symlink("ba", root / "ab")
    for name, target in (("hf_rel", "../secret.safetensors"), ("hf_abs", str(base / "secret.safetensors"))):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
        (root / name / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
    (root / "hf_bad_index").mkdir()
    (root / "hf_bad_index" / "model.safetensors.index.json").write_text("[1, 2")
    (root / "hf_link").mkdir()
    os.symlink(base / "secret.safetensors", root / "hf_link" / "model.safetensors")
    return root


def _inside(path: str, root: Path) -> bool:
    real = Path(path).resolve()
    return real == root or root in real.parents


@pytest.mark.parametrize(
    "ref, words",
    [
        ("loop", "cannot be resolved"),
        ("ba/model.gguf", "cannot be resolved"),
        ("outside.gguf", "outside the model directory"),
        ("escape/secret.gguf", "outside the model directory"),
        ("hf_rel", "names '../secret.safetensors'"),
        ("hf_abs", "not a plain relative file name"),
        ("hf_bad_index", "not a valid index"),
        ("hf_link", "links outside"),
        ("a" * 2000, "longer than"),
        ("x" * 300 + "/m.gguf", "exceeds 255 bytes"),
        ("model.gguf\x00", "NUL"),
    ],
)
def test_tricky_references_are_refused_without_opening_outside(trap_dir, ref, words):
    _RECORD.append([])
    try:
        with pytest.raises(WireError) as e:
            resolve_in_model_dir(ref, trap_dir, pull=False)
    finally:
        opened = _RECORD.pop()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.message, e.value.message
    assert all(_inside(p, trap_dir) for p in opened), opened


def test_a_symlinked_path_that_comes_back_inside_is_fine(trap_dir):
    # escape -> the parent; escape/models/model.gguf is the model directory's own file
    assert resolve_in_model_dir("escape/models/model.gguf", trap_dir, pull=False) == trap_dir / "model.gguf"


_parts = st.sampled_from(
    [
        "model.gguf",
        "outside.gguf",
        "escape",
        "models",
        "loop",
        "ab",
        "ba",
        "hf_rel",
        "hf_abs",
        "hf_link",
        "..",
        ".",
    ]
)
_refs = (
    st.lists(_parts, min_size=1, max_size=5).map("/".join)
    | st.text(max_size=60)
    | st.sampled_from(["/etc/passwd", "~root/.ssh/id_rsa", "C:\\x", "\\\\server\\share", "..\\x", "%2e%2e/x"])
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ref=_refs)
def test_random_references_only_ever_open_inside(trap_dir, ref):
    _RECORD.append([])
    try:
        try:
            path = resolve_in_model_dir(ref, trap_dir, pull=False)
        except WireError as e:
            assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e.message
            return
        assert _inside(str(path), trap_dir), (ref, path)
        try:
            open_checkpoint(path)  # what LoadShard does next: it must read inside too
        except Exception:  # noqa: BLE001 - the fake files are not real checkpoints; only what was opened matters
            pass
    finally:
        opened = _RECORD.pop()
    assert all(_inside(p, trap_dir) for p in opened), (ref, opened)
