"""Low-bit layers of node/lowbit/layers.py (torch kernels), checked on real tensors of the SmolLM2-135M Q4_1 GGUF.

The GGUF comes from the shared `smollm2_path` fixture (tests/conftest.py); EDGESHARD_TEST_GGUF overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from weights import FloatSrc

from edgeshard.node.lowbit import factory
from edgeshard.node.lowbit import layers as quant
from edgeshard.node.lowbit.factory import make_embedding, make_head, make_linear
from edgeshard.node.lowbit.formats import QUANT_FORMATS, WeightSource, compute_dtype, default_quant
from edgeshard.node.lowbit.layers import (
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    module_weight_bytes,
)


@dataclass
class Src:
    """A WeightSource over raw GGUF rows (what the loader hands to make_linear)."""

    name: str
    shape: tuple[int, int]
    ggml_type: QT | None
    data: np.ndarray

    def raw(self) -> np.ndarray:
        return self.data

    def dense(self) -> torch.Tensor:
        return torch.from_numpy(gguf.quants.dequantize(self.data, self.ggml_type))


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests cover the torch-kernel layers; tests/test_amx.py covers the AMX ones (node/lowbit/amx.py)."""
    monkeypatch.setattr(factory, "_amx_kernels", lambda: False)


@pytest.fixture(scope="module")
def tensors(request: pytest.FixtureRequest) -> dict[str, gguf.ReaderTensor]:
    override = os.environ.get("EDGESHARD_TEST_GGUF")
    path = Path(override) if override else Path(request.getfixturevalue("smollm2_path"))
    # GGUFReader parses the tokenizer metadata too (~4 s here): open it once per module
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def src_of(tensors: dict, name: str, rows: int | None = None) -> Src:
    t = tensors[name]
    data = t.data if rows is None else t.data[:rows]
    return Src(name, (data.shape[0], int(t.shape[0])), t.tensor_type, data)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers around |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)


def test_protocol_and_tables() -> None:
    assert isinstance(FloatSrc(torch.zeros(2, 2)), WeightSource)
    assert QUANT_FORMATS == ("f32", "bf16", "int8", "int4")
    assert compute_dtype("f32") == torch.float32
    assert {compute_dtype(q) for q in ("bf16", "int8", "int4")} == {torch.bfloat16}
    assert [default_quant(t) for t in (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q8_0, QT.F16, QT.BF16, QT.F32)] == [
        "int4",
        "int4",
        "int4",
        "int8",
        "bf16",
        "bf16",
        "f32",
    ]
    assert default_quant(None, torch.bfloat16) == "bf16"
    assert default_quant(None) == "f32"
    with pytest.raises(ValueError, match="unknown quant format 'int3'"):
        compute_dtype("int3")


# --- int4 from GGUF 4-bit blocks: the codes are the file's codes -----------------------------------------


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"])
def test_q4_1_codes_are_exact(tensors: dict, name: str) -> None:
    src = src_of(tensors, name, rows=64)
    q, scale, minv = quant._q4_codes(src.raw(), QT.Q4_1, src.shape[1])
    w = (q.reshape(64, -1, 32) * scale[..., None] + minv[..., None]).reshape(src.shape)
    assert np.array_equal(w, gguf.quants.dequantize(src.raw(), QT.Q4_1))


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.5.attn_v.weight"])
def test_q4_1_int4_linear_matches_dequantized(tensors: dict, name: str) -> None:
    src = src_of(tensors, name)
    w = src.dense()  # (out, in) float32 reference
    layer = make_linear(src, None, "int4")
    assert isinstance(layer, Int4Linear) and (layer.bits, layer.group_size) == (4, 32)

    # The kernel sees exactly (q - 8) * bf16(d) + bf16(m + 8d): compare its own read-back to that, per weight.
    q, scale, minv = (torch.from_numpy(a) for a in quant._q4_codes(src.raw(), QT.Q4_1, src.shape[1]))
    s_b = scale.to(torch.bfloat16).float()
    z_b = (minv + 8 * scale).to(torch.bfloat16).float()
    expect = ((q.float().unflatten(1, (-1, 32)) - 8) * s_b[..., None] + z_b[..., None]).flatten(1)
    seen = layer.dequantize()
    assert ((seen - expect).abs() <= bf16_ulp(expect) + 1e-12).all()
    # ... which is the file's weight up to bf16 rounding (relative 2^-8) of the group scale and zero
    zero = (minv + 8 * scale).abs()
    slack = ((8 * scale + zero) * 2**-8).repeat_interleave(32, 1) + bf16_ulp(expect)
    assert ((seen - w).abs() <= slack).all()
    assert rel(seen, w) < 5e-3

    x = torch.randn(3, src.shape[1])
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (3, src.shape[0])
    err = rel(y, F.linear(x.bfloat16().float(), w))  # only bf16 activations/outputs differ
    assert err < 1e-2
    # a plausible mapping bug (zero = m, forgetting the +8d shift) is orders of magnitude worse
    assert rel(F.linear(x, w - 8 * scale.repeat_interleave(32, 1)), F.linear(x, w)) > 50 * err


def test_q4_0_and_q4_k_int4_exact(tensors: dict) -> None:
    w = src_of(tensors, "blk.2.ffn_up.weight", rows=96).dense()  # real weights, 96 x 576
    q40 = Src("q40", (96, 576), QT.Q4_0, gguf.quants.quantize(w.numpy(), QT.Q4_0))
    # Q4_K: random bytes are valid blocks once d/dmin are finite; 256-weight super-blocks
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(48, 2, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.full((48, 2), 0.004, "<f2")[..., None].view(np.uint8)
    blocks[..., 2:4] = np.full((48, 2), 0.002, "<f2")[..., None].view(np.uint8)
    q4k = Src("q4k", (48, 512), QT.Q4_K, blocks.reshape(48, 288))
    for src in (q40, q4k):
        q, scale, minv = quant._q4_codes(src.raw(), src.ggml_type, src.shape[1])
        ref = src.dense()
        exact = (q.reshape(src.shape[0], -1, 32) * scale[..., None] + minv[..., None]).reshape(src.shape)
        assert np.array_equal(exact, ref.numpy()), src.name
        layer = make_linear(src, None, "int4")
        assert rel(layer.dequantize(), ref) < 5e-3, src.name
        x = torch.randn(2, src.shape[1]).bfloat16()
        assert rel(layer(x), F.linear(x.float(), ref)) < 1e-2, src.name


# --- Q8_0: embedding bit-exact, head re-quantized per row -----------------------------------------------


def test_q8_0_embedding_is_exact(tensors: dict) -> None:
    src = src_of(tensors, "token_embd.weight", rows=2048)
    w = src.dense()
    emb = make_embedding(src, "int8")
    assert isinstance(emb, Int8Embedding) and emb.bits == 8
    ids = torch.tensor([[0, 1, 2047], [17, 17, 1000]])
    out = emb(ids)
    assert out.shape == (2, 3, 576) and out.dtype == torch.bfloat16
    assert torch.equal(out, w[ids].bfloat16())
    emb.out_dtype = torch.float32
    assert torch.equal(emb(ids), w[ids])  # bit-exact before the final cast
    assert emb.weight_bytes == 2048 * 576 + 2048 * 18 * 2  # Q8_0's own 34 bytes per 32


def test_q8_0_head_int8(tensors: dict) -> None:
    src = src_of(tensors, "token_embd.weight", rows=4096)
    w = src.dense()
    head = make_head(src, "int8")
    assert isinstance(head, Int8Linear) and head.out_features == 4096
    # one scale per row instead of Q8_0's per 32: measured ~1.2% relative weight error
    assert rel(head.dequantize(), w) < 1.5e-2
    x = torch.randn(2, 576)
    logits = head(x.bfloat16())
    assert logits.dtype == torch.bfloat16
    assert rel(logits, x @ w.T) < 2.5e-2
    assert head.weight_bytes == 4096 * 576 + 4096 * 2


def test_int4_embedding_from_q4_1_is_exact(tensors: dict) -> None:
    src = src_of(tensors, "blk.0.ffn_gate.weight", rows=128)  # any Q4_1 matrix stands in for a table
    emb = make_embedding(src, "int4")
    assert isinstance(emb, Int4Embedding)
    emb.out_dtype = torch.float32
    ids = torch.tensor([0, 5, 127, 64], dtype=torch.int32)
    assert torch.equal(emb(ids), src.dense()[ids])


# --- re-quantization from float --------------------------------------------------------------------------


def test_int4_requant_from_float_error_bound() -> None:
    torch.manual_seed(0)
    w = torch.randn(80, 256) * 0.05  # 80 rows: not a multiple of 64, exercises the padded last block
    layer = make_linear(FloatSrc(w), None, "int4")
    seen = layer.dequantize()
    g = w.unflatten(1, (-1, 32))
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, 1)  # (80, 256)
    # rounding to the nearest of 16 levels (half a step), plus bf16 scale/zero and read-back rounding
    assert ((seen - w).abs() <= 0.5 * step + 10 * step * 2**-8 + bf16_ulp(w)).all()
    assert rel(seen, w) < 0.1
    x = torch.randn(4, 256)
    assert rel(layer(x.bfloat16()), x @ w.T) < 0.1


def test_int4_requant_of_q4_1_weights_is_lossless(tensors: dict) -> None:
    # Q4_1 groups span q = 0..15 by construction, so min/max re-quantization finds the same grid.
    src = src_of(tensors, "blk.1.attn_output.weight", rows=64)
    from_raw = make_linear(src, None, "int4")
    from_dense = make_linear(FloatSrc(src.dense()), None, "int4")
    assert rel(from_dense.dequantize(), from_raw.dequantize()) < 1e-3


def test_int8_requant_from_float_error_bound() -> None:
    torch.manual_seed(0)
    w = torch.randn(40, 576) * 0.05
    layer = make_linear(FloatSrc(w), None, "int8")
    assert isinstance(layer, Int8Linear)
    scale = layer.scales.float()
    assert (scale * 127 >= w.abs().amax(1)).all()  # scale rounded up: the row maximum never clips
    assert ((layer.dequantize() - w).abs() <= 0.5 * scale[:, None] * (1 + 1e-6)).all()
    assert rel(layer.dequantize(), w) < 1.5e-2
    x = torch.randn(4, 576)
    assert rel(layer(x.bfloat16()), x @ w.T) < 2e-2


def test_dense_formats(tensors: dict) -> None:
    src = src_of(tensors, "blk.0.attn_k.weight")
    w = src.dense()
    x = torch.randn(2, 576)
    f32 = make_linear(src, None, "f32")
    assert isinstance(f32, torch.nn.Linear) and torch.allclose(f32(x), x @ w.T, rtol=1e-5, atol=1e-5)
    bf = make_linear(src, None, "bf16")
    assert bf.weight.dtype == torch.bfloat16 and rel(bf(x.bfloat16()), x @ w.T) < 1e-2


# --- bytes, bias, shapes, errors -------------------------------------------------------------------------


def test_weight_bytes(tensors: dict) -> None:
    src = src_of(tensors, "blk.0.ffn_up.weight")
    fp32_bytes = 1536 * 576 * 4
    l4 = make_linear(src, None, "int4")
    l8 = make_linear(src, None, "int8")
    assert l4.weight_bytes <= 0.3 * fp32_bytes
    assert l4.weight_bytes == 1536 * 576 // 2 + 576 // 32 * 1536 * 2 * 2  # codes + bf16 (scale, zero)
    assert l8.weight_bytes == 1536 * 576 + 1536 * 2
    stage = torch.nn.ModuleList([l4, l8, l8])  # the shared layer counts once
    assert module_weight_bytes(stage) == l4.weight_bytes + l8.weight_bytes


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16", "f32"])
def test_bias_and_leading_dims(fmt: str) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(48, 64) * 0.1, torch.randn(48)
    layer = make_linear(FloatSrc(w), b, fmt)
    no_bias = make_linear(FloatSrc(w), None, fmt)
    x = torch.randn(2, 3, 64).to(compute_dtype(fmt))
    y = layer(x)
    assert y.shape == (2, 3, 48) and y.dtype == compute_dtype(fmt)
    assert torch.allclose(y.float(), no_bias(x).float() + b, atol=3e-2)
    assert layer(x[0, 0]).shape == (48,)  # 1-D input
    assert layer(x.transpose(0, 1)).shape == (3, 2, 48)  # non-contiguous input
    assert module_weight_bytes(layer) > module_weight_bytes(no_bias)


def test_wrong_inputs_raise_clear_errors(tensors: dict) -> None:
    layer = make_linear(FloatSrc(torch.randn(32, 64)), None, "int4")
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 64\) of dtype torch.bfloat16.*float32"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"got shape \(2, 65\)"):
        layer(torch.randn(2, 65).bfloat16())
    with pytest.raises(ValueError, match="in_features divisible by 32"):
        make_linear(FloatSrc(torch.randn(32, 48)), None, "int4")
    with pytest.raises(ValueError, match="bias has shape"):
        make_linear(FloatSrc(torch.randn(32, 64)), torch.zeros(31), "int8")
    with pytest.raises(ValueError, match="unknown quant format"):
        make_linear(FloatSrc(torch.randn(32, 64)), None, "q4")
    src = src_of(tensors, "blk.0.attn_q.weight")
    bad = Src(src.name, src.shape, src.ggml_type, src.data[:, :-1])
    with pytest.raises(ValueError, match=r"blk.0.attn_q.weight: raw\(\) of a Q4_1"):
        make_linear(bad, None, "int4")
    emb = make_embedding(FloatSrc(torch.randn(10, 64)), "int8")
    with pytest.raises(ValueError, match="token ids must be int64 or int32"):
        emb(torch.tensor([1.0]))


def test_chunked_packing_is_identical(tensors: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    src = src_of(tensors, "blk.0.attn_q.weight")
    whole = make_linear(src, None, "int4")
    monkeypatch.setattr(quant, "_CHUNK_ELEMS", 64 * 576)  # 64-row chunks
    chunked = make_linear(src, None, "int4")
    assert torch.equal(whole.weight_packed, chunked.weight_packed)
    assert torch.equal(whole.scales_and_zeros, chunked.scales_and_zeros)


def test_dtype_casts_leave_formats_alone() -> None:
    layer = make_linear(FloatSrc(torch.randn(32, 64)), torch.randn(32), "int4")
    emb = make_embedding(FloatSrc(torch.randn(10, 64)), "int8")
    stage = torch.nn.ModuleList([layer, emb]).to(torch.float32)
    assert layer.scales_and_zeros.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert emb.scales.dtype == torch.float32 and emb.weight.dtype == torch.int8
    stage.half()
    assert layer.scales_and_zeros.dtype == torch.bfloat16 and emb.scales.dtype == torch.float32
    assert layer(torch.randn(1, 64).bfloat16()).shape == (1, 32)


# --- many rows: dequantize once and run a bf16 matmul (prefill) --------------------------------------------


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("out_f", [192, 200])  # 200 rows pad to 208: not whole int4pack blocks
def test_dense_path_matches_kernel(fmt: str, out_f: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above dense_min_rows the layers dequantize and matmul in bf16: same result to bf16 precision."""
    torch.manual_seed(0)
    w, b = torch.randn(out_f, 576) * 0.05, torch.randn(out_f)
    layer = make_linear(FloatSrc(w), b, fmt)
    x = torch.randn(layer.dense_min_rows + 3, 576).bfloat16()
    dense = layer(x)
    monkeypatch.setattr(type(layer), "dense_min_rows", 1 << 30)  # every row count through the kernel
    kernel = layer(x)
    assert dense.shape == kernel.shape == (x.shape[0], out_f) and dense.dtype == torch.bfloat16
    # the kernel rounds once (bf16 output); the dense path also rounds the weights (and int4 its zero) to bf16
    assert rel(dense, kernel) < 6e-3
    monkeypatch.setattr(type(layer), "dense_min_rows", 1)
    monkeypatch.setattr(quant, "_CHUNK_ELEMS", 64 * 576)  # chunks of 64 rows: several matmuls, one result
    assert rel(layer(x), kernel) < 6e-3


def test_int4pack_layout_is_read_exactly() -> None:
    """The probed int4pack layout reads codes back exactly, so the dense path sees the kernel's weights."""
    layout = quant._int4pack_layout()
    if layout is None:
        pytest.skip("this CPU packs int4 in a layout the dense path does not read (it keeps the kernel)")
    torch.manual_seed(0)
    layer = Int4Linear.from_float(torch.randn(320, 128))
    assert layer._layout == layout
    via_kernel = layer.dequantize()  # (out, in) read back through the kernel with an identity matrix
    unpacked = layer._dequantized_chunk(0, 320).T.float()
    # both are (q - 8) * scale + zero; unpacking folds -8 * scale into the zero (bf16): half a bf16 ulp apart
    assert (unpacked - via_kernel).abs().max() <= bf16_ulp(via_kernel).max()
