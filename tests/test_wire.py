"""The wire protocol: generated code is current, tensors round-trip, malformed input is refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from edgeshard.node.weights.model_dir import resolve_in_model_dir
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import (
    WireError,
    sampling_from_wire,
    sampling_to_wire,
    step_from_wire,
    tensor_from_wire,
    tensor_to_wire,
    tokens_from_wire,
)

ROOT = Path(__file__).resolve().parent.parent
WIRE = ROOT / "node" / "wire"


def _unstamped(text: str) -> str:
    """Generated code without the lines that only name the generator's version."""
    drop = ("GRPC_GENERATED_VERSION = ", "# Protobuf Python Version:")
    return "\n".join(line for line in text.splitlines() if not line.startswith(drop))


def test_generated_code_is_current(tmp_path):
    """Regenerate from the proto into a temp dir: the committed modules must match (run scripts/gen_proto.py)."""
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh_grpc = (tmp_path / "edgeshard_pb2_grpc.py").read_text()
    assert "from edgeshard.node.wire import edgeshard_pb2" in fresh_grpc  # the import mapping works
    for name in ("edgeshard_pb2.py", "edgeshard_pb2_grpc.py", "edgeshard_pb2.pyi"):
        fresh, committed = _unstamped((tmp_path / name).read_text()), _unstamped((WIRE / name).read_text())
        if fresh != committed:
            # A different protoc may lay out the module differently; the descriptor must still be identical.
            assert name == "edgeshard_pb2.py", f"{name} is stale: run `python scripts/gen_proto.py`"
            from google.protobuf import descriptor_pb2

            def fd(text: str) -> bytes:
                start = text.index("AddSerializedFile(") + len("AddSerializedFile(")
                return eval(text[start : text.index(")\n", start)])  # a bytes literal written by protoc

            a, b = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
            a.ParseFromString(fd(fresh))
            b.ParseFromString(fd(committed))
            assert a == b, "node/wire/edgeshard_pb2.py is stale: run `python scripts/gen_proto.py`"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tensor_round_trip(dtype):
    x = torch.randn(5, 64).to(dtype)
    msg = pb.Tensor.FromString(tensor_to_wire(x).SerializeToString())
    y = tensor_from_wire(msg, hidden_size=64)
    assert y.dtype == dtype and y.shape == (5, 64)
    assert torch.equal(x, y)


def test_tensor_from_a_row_slice_sends_only_the_rows():
    x = torch.randn(10, 8)
    msg = tensor_to_wire(x[3:5])
    assert len(msg.data) == 2 * 8 * 4
    assert torch.equal(tensor_from_wire(msg, 8), x[3:5])


def _bad(msg: pb.Tensor, hidden: int = 8) -> str:
    with pytest.raises(WireError) as e:
        tensor_from_wire(msg, hidden, max_rows=16)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return e.value.message


def test_tensor_validation_says_what_is_wrong():
    good = tensor_to_wire(torch.zeros(2, 8, dtype=torch.bfloat16))
    assert "dtype" in _bad(pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[2, 8], data=good.data))
    assert "dtype" in _bad(pb.Tensor(dtype=17, shape=[2, 8], data=good.data))
    assert "shape (T, 8)" in _bad(pb.Tensor(dtype=pb.DTYPE_BF16, shape=[2, 4, 2], data=good.data))
    assert "shape (T, 8)" in _bad(pb.Tensor(dtype=pb.DTYPE_BF16, shape=[2, 9], data=good.data))
    assert "bytes" in _bad(pb.Tensor(dtype=pb.DTYPE_BF16, shape=[2, 8], data=good.data[:-1]))
    assert "bytes" in _bad(pb.Tensor(dtype=pb.DTYPE_F32, shape=[2, 8], data=good.data))
    assert "1..16 rows" in _bad(pb.Tensor(dtype=pb.DTYPE_BF16, shape=[17, 8], data=b"\0" * 17 * 16))
    assert "1..16 rows" in _bad(pb.Tensor(dtype=pb.DTYPE_BF16, shape=[0, 8], data=b""))


def test_tokens_validation():
    assert tokens_from_wire(pb.TokenIds(ids=[1, 2, 3]), 10).tolist() == [1, 2, 3]
    for ids, want in (([], "1..16"), ([3, 10], "[0, 10)"), ([-1], "[0, 10)"), (list(range(17)), "1..16")):
        with pytest.raises(WireError, match=want.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            tokens_from_wire(pb.TokenIds(ids=ids), 10, max_rows=16)


def test_step_payload_must_match_the_stage():
    tokens = pb.ForwardMessage(session_id="s", start=0, sample=True, tokens=pb.TokenIds(ids=[1]))
    hidden = pb.ForwardMessage(session_id="s", start=3, hidden=tensor_to_wire(torch.zeros(1, 8)))
    assert step_from_wire(tokens, True, 8, 10).tokens.tolist() == [1]
    assert step_from_wire(hidden, False, 8, 10).start == 3
    with pytest.raises(WireError, match="takes token ids"):
        step_from_wire(hidden, True, 8, 10)
    with pytest.raises(WireError, match="takes hidden states"):
        step_from_wire(tokens, False, 8, 10)
    with pytest.raises(WireError, match="session_id"):
        step_from_wire(pb.ForwardMessage(tokens=pb.TokenIds(ids=[1])), True, 8, 10)


def test_sampling_params_round_trip_exactly():
    from edgeshard.node.model.sampling import SamplingParams

    for p in (SamplingParams(), SamplingParams(0.7, 40, 0.9, 1234), SamplingParams(1.3, 0, 0.95, None)):
        assert sampling_from_wire(pb.SamplingParams.FromString(sampling_to_wire(p).SerializeToString())) == p
    with pytest.raises(WireError, match="temperature"):
        sampling_from_wire(pb.SamplingParams(temperature=-1))


# ------------------------------------------------------------------------------------------ model directory


@pytest.fixture
def model_dir(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "m.gguf").write_bytes(b"GGUF")
    (root / "sub").mkdir()
    (root / "sub" / "x.gguf").write_bytes(b"GGUF")
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"GGUF")
    os.symlink(secret, root / "link.gguf")
    os.symlink(tmp_path, root / "escape")
    os.symlink(root / "m.gguf", root / "inside-link.gguf")
    return root


def test_model_refs_inside_the_dir_resolve(model_dir):
    assert resolve_in_model_dir("m.gguf", model_dir) == (model_dir / "m.gguf").resolve()
    assert resolve_in_model_dir("sub/x.gguf", model_dir) == (model_dir / "sub" / "x.gguf").resolve()
    assert resolve_in_model_dir("./inside-link.gguf", model_dir) == (model_dir / "m.gguf").resolve()


@pytest.mark.parametrize(
    "ref",
    [
        "/etc/passwd",
        "../secret.gguf",
        "sub/../../secret.gguf",
        "link.gguf",
        "escape/secret.gguf",
        "",
        "~/x.gguf",
        "C:\\x.gguf",
        "..\\secret.gguf",
    ],
)
def test_path_traversal_is_refused(model_dir, ref):
    with pytest.raises(WireError) as e:
        resolve_in_model_dir(ref, model_dir)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused" in e.value.message


def test_missing_model_is_not_found(model_dir):
    with pytest.raises(WireError) as e:
        resolve_in_model_dir("nope.gguf", model_dir)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "--model-dir" in e.value.message
