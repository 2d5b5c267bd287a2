"""The AMX low-bit layers (node/lowbit/amx.py over node/lowbit/csrc/lowbit.c), against exact references.

Skipped on CPUs without AMX-BF16 (the layers are not used there); the fallback test runs everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from weights import FloatSrc

from edgeshard.node.lowbit import factory, native
from edgeshard.node.lowbit import layers as quant
from edgeshard.node.lowbit.factory import make_linear
from edgeshard.node.lowbit.layers import Int4Linear, Int8Linear

amx = pytest.mark.skipif(not native.amx(), reason=f"no AMX kernels here: {native.status()}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def q4_1_source(smollm2_path):
    """A real Q4_1 tensor of the demo model (ffn_down: 576 x 1536) as a WeightSource."""
    from edgeshard.node.weights.checkpoint import open_checkpoint

    ckpt = open_checkpoint(smollm2_path)
    src = ckpt.weight("model.layers.3.mlp.down_proj.weight")
    assert src.ggml_type == QT.Q4_1
    return src


@amx
def test_int4_from_q4_1_is_the_files_weights(q4_1_source) -> None:
    """Q4_1 codes, scales and mins are copied: the layer's weights are the file's, to float32 rounding."""
    layer = make_linear(q4_1_source, None, "int4")
    assert type(layer).__name__ == "AmxInt4Linear" and isinstance(layer, Int4Linear)
    w = q4_1_source.dense()
    assert (layer.dequantize() - w).abs().max() <= 1e-6 * w.abs().max()
    x = torch.randn(5, w.shape[1]).bfloat16()
    exact = F.linear(x.float(), w)
    err = rel(layer(x), exact)
    assert err < 4e-3  # bf16 weights in the dot products and a bf16 output: a few 2^-9
    # a mapping bug (a min off by one code step) would be far worse than the rounding
    off = F.linear(x.float(), w + layer.dequantize().std() / 4)
    assert rel(off, exact) > 20 * err


@amx
@pytest.mark.parametrize("out_features", [32, 200, 49])  # whole blocks, a ragged last block, odd
def test_int4_and_int8_match_their_dequantized_weights(out_features: int) -> None:
    torch.manual_seed(out_features)
    w, b = torch.randn(out_features, 96) * 0.1, torch.randn(out_features)
    for fmt in ("int4", "int8"):
        layer = make_linear(FloatSrc(w), b, fmt)
        assert type(layer).__name__.startswith("Amx")
        x = torch.randn(2, 3, 96).bfloat16()  # leading dims pass through
        y = layer(x)
        assert y.shape == (2, 3, out_features) and y.dtype == torch.bfloat16
        ref = F.linear(x.float(), layer.dequantize(), b.bfloat16().float())
        assert rel(y, ref) < 4e-3, fmt


@amx
def test_same_weights_as_torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """From a float weight, the AMX and torch layers quantize to the same codes (int8 exactly; int4 up to
    the torch layer's bf16 parameters)."""
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    amx8, amx4 = make_linear(FloatSrc(w), None, "int8"), make_linear(FloatSrc(w), None, "int4")
    monkeypatch.setattr(factory, "_amx_kernels", lambda: False)
    t8, t4 = make_linear(FloatSrc(w), None, "int8"), make_linear(FloatSrc(w), None, "int4")
    assert type(t8) is Int8Linear and type(t4) is Int4Linear
    assert torch.equal(amx8.dequantize(), t8.dequantize())
    # int4: the torch layer rounds scale and zero to bf16 before choosing codes; float32 here is as close
    assert rel(amx4.dequantize(), w) <= rel(t4.dequantize(), w) + 1e-3 < 0.1
    x = torch.randn(4, 128).bfloat16()
    assert rel(amx8(x), t8(x)) < 8e-3


@amx
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_rows_give_identical_results_alone_or_batched(fmt: str) -> None:
    """Each row is computed the same way whatever the batch: batched decode equals one-at-a-time exactly,
    also across the 16-row tiles and with several threads."""
    torch.manual_seed(2)
    layer = make_linear(FloatSrc(torch.randn(80, 64)), None, fmt)
    x = torch.randn(37, 64).bfloat16()
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(37)])
    assert torch.equal(together, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = make_linear(FloatSrc(torch.randn(4096, 512)), None, fmt)  # large enough to go parallel
        xb = torch.randn(3, 512).bfloat16()
        two = big(xb)
        torch.set_num_threads(1)
        assert torch.equal(two, big(xb))
    finally:
        torch.set_num_threads(threads)


@amx
def test_bytes_and_errors() -> None:
    w = torch.randn(1536, 576)
    l4, l8 = make_linear(FloatSrc(w), None, "int4"), make_linear(FloatSrc(w), None, "int8")
    fp32 = w.numel() * 4
    assert l4.weight_bytes == 1536 * 576 // 2 + 1536 * 576 // 32 * 2 * 2  # codes + float16 (scale, min)
    assert l4.weight_bytes <= 0.2 * fp32
    assert l8.weight_bytes == 1536 * 576 + 1536 * 2
    assert quant.weight_format(l4)["bits"] == 4 and quant.weight_format(l8)["bits"] == 8
    with pytest.raises(ValueError, match="expected input"):
        l4(torch.randn(1, 576))  # float32: the stage must cast once
    with pytest.raises(ValueError, match="expected input"):
        l8(torch.randn(1, 575).bfloat16())


def test_fallback_without_native_kernels() -> None:
    """EDGESHARD_NATIVE=0 (or a CPU without AMX) builds the torch-kernel layers and says why."""
    code = (
        "from edgeshard.node.lowbit import factory, native\n"
        "from edgeshard.node.lowbit import layers as quant\n"
        "import torch\n"
        "print(native.status())\n"
        "print(type(quant.Int8Linear.from_float(torch.randn(32, 64))).__name__)\n"
        "class S:\n"
        "    name, shape, ggml_type = 'w', (32, 64), None\n"
        "    def dense(self): return torch.randn(32, 64)\n"
        "print(type(factory.make_linear(S(), None, 'int4')).__name__)\n"
    )
    env = {**os.environ, "EDGESHARD_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    status, int8_cls, int4_cls = out.strip().splitlines()
    assert "torch kernels" in status and "EDGESHARD_NATIVE=0" in status
    assert (int8_cls, int4_cls) == ("Int8Linear", "Int4Linear")


# --- decode rows through the whole stage in one native call (node/model/fused.py, node/lowbit/csrc/decode.c) -----------


@pytest.fixture(scope="module")
def int4_ckpt(smollm2_path):
    from edgeshard.node.weights.checkpoint import open_checkpoint

    return open_checkpoint(smollm2_path)


def _decode(stages, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Prefill `prompt` through the stages, then one decode row per id of `steps`: (len(steps), V) logits."""
    from edgeshard.node.model.decoder import Segment

    caches = [s.new_cache(256) for s in stages]

    def through(ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor(ids)
        for stage, cache in zip(stages, caches):
            x = stage(x, [Segment(cache, start, len(ids))])
        return x

    through(prompt, 0)
    return torch.cat([through([t], len(prompt) + i) for i, t in enumerate(steps)])


@amx
def test_fused_decode_matches_the_modules(int4_ckpt) -> None:
    from edgeshard.node.model.config import ShardSpec
    from edgeshard.node.weights.loader import load_stage

    stage = load_stage(int4_ckpt, ShardSpec.full(30), quant="int4")
    assert stage.fused_decode() is not None
    prompt, steps = [1, 504, 3458, 282, 260, 1345, 30, 378], [5112, 314, 253, 1789, 282, 260]
    fused = _decode([stage], prompt, steps)
    stage._fused = None  # the module path
    modules = _decode([stage], prompt, steps)
    assert rel(fused, modules) < 2e-2  # different bf16 rounding order over 30 layers (int4 vs f32: ~2%)
    assert (fused.argmax(-1) == modules.argmax(-1)).float().mean() >= 5 / 6
    stage.refresh_fused()
    assert torch.equal(_decode([stage], prompt, steps), fused)  # rebuilt: deterministic


@amx
def test_decode_rows_do_not_depend_on_their_batch_or_split(int4_ckpt) -> None:
    """A decode row gives bit-identical logits alone, batched with other decode rows and a prefill chunk,
    and with the layers split over three stages."""
    from edgeshard.node.model.config import ShardSpec, even_split
    from edgeshard.node.model.decoder import Segment
    from edgeshard.node.weights.loader import load_stage

    stage = load_stage(int4_ckpt, ShardSpec.full(30), quant="int4")
    a, b, c = [1, 504, 3458, 282], [1, 22, 2113, 17, 990], [1, 3458, 30, 378, 260, 5112, 314]
    alone = _decode([stage], a[:-1], a[-1:])
    ca, cb, cc = stage.new_cache(64), stage.new_cache(64), stage.new_cache(64)
    stage(torch.tensor(a[:-1]), [Segment(ca, 0, len(a) - 1)])
    stage(torch.tensor(b[:-1]), [Segment(cb, 0, len(b) - 1)])
    mixed = stage(
        torch.tensor([b[-1], *c, a[-1]]),
        [Segment(cb, len(b) - 1, 1), Segment(cc, 0, len(c)), Segment(ca, len(a) - 1, 1)],
    )
    assert torch.equal(mixed[2:3], alone)
    split = [load_stage(int4_ckpt, s, quant="int4") for s in even_split(30, 3)]
    assert torch.equal(_decode(split, a[:-1], a[-1:]), alone)
