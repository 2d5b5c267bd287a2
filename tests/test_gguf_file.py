"""Our fast GGUF parser against the `gguf` package's reader, on the real file and on broken files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgeshard.node.weights.gguf_file import GGUFFile, GGUFFormatError


def test_fields_and_tensors_match_gguf_reader(smollm2_path):
    ours, ref = GGUFFile(smollm2_path), gguf.GGUFReader(smollm2_path)
    assert set(ours.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key in ours.fields:
        a, b = ours.fields[key].contents(), ref.fields[key].contents()
        if isinstance(b, float):
            assert a == pytest.approx(b)
        else:
            assert a == b, key
    assert len(ours.tensors) == len(ref.tensors) == 272
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.data_offset, a.n_bytes) == (
            b.name,
            b.tensor_type,
            int(b.data_offset),
            int(b.n_bytes),
        )
        assert a.shape == tuple(int(d) for d in b.shape)
        if a.name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.3.ffn_norm.weight"):
            np.testing.assert_array_equal(a.data, b.data)


def test_broken_files_are_clear_errors(smollm2_path, tmp_path):
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        GGUFFile(tmp_path / "magic.gguf")
    head = smollm2_path.read_bytes()[:5000]  # ends inside the vocabulary
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(GGUFFormatError, match="truncated|past the end"):
        GGUFFile(tmp_path / "cut.gguf")
