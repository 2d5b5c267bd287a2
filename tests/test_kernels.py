"""The integer dot-product kernels (node/lowbit/csrc/dot.c via node/lowbit/kernels.py) on every kernel set this machine
runs, each forced through EDGESHARD_KERNELS: against exact references, and batch invariance from the
kernel up to eight concurrent greedy sequences through ShardExecutor.

The AMX kernels have their own file (tests/test_amx.py). Numbers only: no timing here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cross import aarch64_tools
from gguf import GGMLQuantizationType as QT
from weights import FloatSrc

from edgeshard.node.lowbit import native
from edgeshard.node.lowbit.factory import make_linear
from edgeshard.node.lowbit.kernels import DotInt4Linear, DotInt8Linear, quantize_rows
from edgeshard.node.lowbit.layers import Int4Linear, Int8Linear

ALL_SETS = [v for v in native.VARIANTS if v != "amx" and not native.runnable(v)]  # "generic" runs anywhere
FAST_SETS = [v for v in ALL_SETS if v != "generic"]  # plain C is too slow for whole-model tests
pytestmark = pytest.mark.skipif(not ALL_SETS, reason="no C compiler or no runnable kernel set")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _force(monkeypatch: pytest.MonkeyPatch, name: str):
    monkeypatch.setenv("EDGESHARD_KERNELS", name)
    native.reset()
    assert native.kernel_set() == name, native.status()
    yield name
    monkeypatch.undo()
    native.reset()


@pytest.fixture(params=ALL_SETS)
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Each runnable kernel set in turn, forced for the layers the test builds."""
    yield from _force(monkeypatch, request.param)


@pytest.fixture(params=FAST_SETS or [pytest.param("none", marks=pytest.mark.skip("no SIMD kernel set"))])
def fast_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    yield from _force(monkeypatch, request.param)


def _emulated(layer, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: the input rows quantized exactly as dot.c does, times the
    layer's dequantized weight; the kernel then differs only by float32 accumulation and bf16 output."""
    q, d = quantize_rows(x)
    xe = (q.view(*d.shape, 32).double() * d.double()[..., None]).flatten(-2)
    return xe @ layer.dequantize().double().T


@pytest.mark.parametrize("out_features", [32, 200, 49])  # whole blocks, a ragged last block, odd
def test_layers_match_references(kernels: str, out_features: int) -> None:
    torch.manual_seed(out_features)
    w, b = torch.randn(out_features, 576) * 0.1, torch.randn(out_features)
    for fmt, cls in (("int4", DotInt4Linear), ("int8", DotInt8Linear)):
        layer = make_linear(FloatSrc(w), b, fmt)
        assert type(layer) is cls and layer.kernel == kernels
        x = torch.randn(2, 3, 576).bfloat16()  # leading dims pass through
        y = layer(x)
        assert y.shape == (2, 3, out_features) and y.dtype == torch.bfloat16
        # (1) tight: the kernel's own arithmetic, up to float32 sums and two bf16 roundings (the product's,
        # then the bias add's: up to half a bf16 step, 2^-8 relative, of each)
        product = _emulated(layer, x.view(6, 576))
        exact = product + b.bfloat16().double()
        err = (y.view(6, -1).double() - exact).abs()
        assert (err <= 2.0**-8 * (product.abs() + exact.abs()) + 1e-5 * exact.abs().max()).all(), fmt
        # (2) against the float product with the same weights: int8 input rows cost ~0.5%
        ref = F.linear(x.float(), layer.dequantize(), b.bfloat16().float())
        assert rel(y, ref) < 1.5e-2, fmt


def test_q4_1_codes_are_the_files_weights(kernels: str, smollm2_path) -> None:
    """Q4_1 codes, scales and mins are copied exactly into dot.c's layout; a mapping bug (a min off by one
    code step) would be far worse than the kernel's rounding."""
    from edgeshard.node.weights.checkpoint import open_checkpoint

    src = open_checkpoint(smollm2_path).weight("model.layers.3.mlp.down_proj.weight")
    assert src.ggml_type == QT.Q4_1
    layer = make_linear(src, None, "int4")
    w = src.dense()
    assert type(layer) is DotInt4Linear and isinstance(layer, Int4Linear)
    assert (layer.dequantize() - w).abs().max() <= 1e-6 * w.abs().max()
    x = torch.randn(5, w.shape[1]).bfloat16()
    exact = F.linear(x.float(), w)
    err = rel(layer(x), exact)
    assert err < 1.5e-2
    assert rel(F.linear(x.float(), w + w.std() / 4), exact) > 10 * err


def test_every_kernel_set_computes_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a block the sums are exact integers, and the float steps per output are the same in every
    ISA (dot.c): AVX2, AVX-512 and NEON give the plain C kernel's bits."""
    torch.manual_seed(5)
    w, x = torch.randn(200, 576) * 0.1, torch.randn(9, 576).bfloat16()
    outputs = {}
    for name in ALL_SETS:
        monkeypatch.setenv("EDGESHARD_KERNELS", name)
        native.reset()
        outputs[name] = [make_linear(FloatSrc(w), None, fmt)(x) for fmt in ("int4", "int8")]
    native.reset()
    first = next(iter(outputs.values()))
    for name, ys in outputs.items():
        assert all(torch.equal(a, b) for a, b in zip(ys, first)), name


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_row_gives_the_same_bits_alone_or_in_any_batch(kernels: str, fmt: str) -> None:
    """Batches of 1..16 rows (and 37), one or two threads: every row's output is the same bits."""
    torch.manual_seed(2)
    layer = make_linear(FloatSrc(torch.randn(80, 576)), None, fmt)
    x = torch.randn(37, 576).bfloat16()
    alone = torch.cat([layer(x[i : i + 1]) for i in range(37)])
    for m in range(2, 17):
        assert torch.equal(layer(x[:m]), alone[:m]), m
    assert torch.equal(layer(x), alone)
    threads = torch.get_num_threads()
    try:
        big = make_linear(FloatSrc(torch.randn(4096, 512)), None, fmt)  # large enough to go parallel
        xb = torch.randn(5, 512).bfloat16()
        torch.set_num_threads(2)
        two = big(xb)
        torch.set_num_threads(1)
        assert torch.equal(two, big(xb))
        assert torch.equal(two[3:4], big(xb[3:4]))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("rows", [2, 3, 5, 8, 13, 128])  # tiles of 4 rows, ragged tiles, a prefill chunk
def test_tiled_rows_match_the_reference_and_their_rows_alone(kernels: str, fmt: str, rows: int) -> None:
    """Several rows go through dot.c's tiles (each weight block expanded once for up to 4 rows): every row
    equals its one-row result bit for bit, whatever its place in the tile, and matches the dequantized
    reference as tightly as one row does (a ragged last output block: 200 = 12 * 16 + 8)."""
    torch.manual_seed(rows)
    layer = make_linear(FloatSrc(torch.randn(200, 576) * 0.1), None, fmt)
    x = torch.randn(rows + 3, 576).bfloat16()
    y = layer(x[:rows])
    alone = torch.cat([layer(x[i : i + 1]) for i in range(rows + 3)])
    assert torch.equal(y, alone[:rows])
    assert torch.equal(layer(x[3:]), alone[3:])  # every row at another place of its tile
    product = _emulated(layer, x[:rows])
    err = (y.double() - product).abs()
    assert (err <= 2.0**-8 * product.abs() + 1e-5 * product.abs().max()).all()
    assert rel(y, F.linear(x[:rows].float(), layer.dequantize())) < 1.5e-2


HARNESS = Path(__file__).with_name("dot_harness.c")
_CROSS = [
    ("neon-dot", "-march=armv8.2-a+dotprod"),
    ("neon", "-march=armv8-a"),
]


def _harness(cc: list[str], flags: list[str], tmp_path: Path, runner: list[str]) -> str:
    exe = tmp_path / "harness"
    common = ["-O2", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    subprocess.run(
        [*cc, *common, *flags, "-o", str(exe), str(HARNESS), "-lm"], check=True, capture_output=True
    )
    out = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("name", ALL_SETS)
def test_the_c_harness_on_this_cpu(name: str, tmp_path: Path) -> None:
    """tests/dot_harness.c: SIMD kernels = scalar model bit for bit, and the stage call's batch invariance."""
    cc = native._compiler()
    assert _harness([cc], native.VARIANTS[name][0], tmp_path, []).startswith(f"{name}: ok")


@pytest.mark.parametrize("name,flags", _CROSS)
def test_the_c_harness_on_aarch64_under_qemu(name: str, flags: str, tmp_path: Path) -> None:
    """The NEON kernels, built for aarch64 and run under qemu-user (skipped without the cross tools)."""
    cc, runner = aarch64_tools(name)
    assert _harness(cc, [flags], tmp_path, runner).startswith(f"{name}: ok")


def test_bytes_and_errors(kernels: str) -> None:
    w = torch.randn(1536, 576)
    l4, l8 = make_linear(FloatSrc(w), None, "int4"), make_linear(FloatSrc(w), None, "int8")
    assert l4.weight_bytes == 1536 * 576 // 2 + 1536 * 576 // 32 * 2 * 2  # codes + float16 (scale, min)
    assert l8.weight_bytes == 1536 * 576 + 1536 * 2
    assert isinstance(l8, Int8Linear) and f"kernel={kernels}" in repr(l4)
    with pytest.raises(ValueError, match="expected input"):
        l4(torch.randn(1, 576))  # float32: the stage must cast once
    with pytest.raises(ValueError, match="expected input"):
        l8(torch.randn(1, 575).bfloat16())


def test_the_switch_picks_and_refuses_kernel_sets() -> None:
    """EDGESHARD_KERNELS forces a set; one this CPU cannot run falls back to torch's kernels and says why."""
    code = "from edgeshard.node.lowbit import native\nprint(native.kernel_set())\nprint(native.status())\n"

    def run(value: str) -> list[str]:
        env = {**os.environ, "EDGESHARD_KERNELS": value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.strip().splitlines()

    assert run("torch")[0] == "torch" and "EDGESHARD_KERNELS=torch" in run("torch")[1]
    assert run("generic")[0] == "generic"
    impossible = "neon" if native.cpu_features() >= {"avx2"} else "avx2"
    name, status = run(impossible)
    assert name == "torch" and "torch kernels" in status and impossible in status


def test_the_torch_fallback_is_not_batch_invariant_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents the torch fallback (EDGESHARD_KERNELS=torch, or no compiler / no AVX2 or NEON): torch's
    int4/int8 kernels and the dense bf16 path for many rows are each row-invariant here, but a layer switches
    between them at `dense_min_rows` rows, so a row's bits depend on how many rows share its batch; the
    status line says so (docs/kernels.md). If this fails because the switch stopped changing bits, the
    fallback became batch-invariant: update the status, the docs and this test."""
    monkeypatch.setenv("EDGESHARD_KERNELS", "torch")
    native.reset()
    try:
        assert native.kernel_set() == "torch"
        assert native.TORCH_NOT_BATCH_INVARIANT in native.status()
        torch.manual_seed(2)
        changed = {}
        for fmt, cls in (("int4", Int4Linear), ("int8", Int8Linear)):
            layer = make_linear(FloatSrc(torch.randn(1536, 576) * 0.1), None, fmt)
            assert type(layer) is cls
            few = layer.dense_min_rows - 1  # the low-bit kernel; from dense_min_rows rows on, dense bf16
            x = torch.randn(layer.dense_min_rows, 576).bfloat16()
            alone = torch.cat([layer(x[i : i + 1]) for i in range(few)])
            assert torch.equal(layer(x[:few]), alone)  # each path alone keeps a row's bits
            many = layer(x)
            changed[fmt] = (many[:few] != alone).any(dim=1).float().mean().item()
    finally:
        monkeypatch.undo()
        native.reset()
    assert all(share > 0.5 for share in changed.values()), changed


# --- whole-stage decode (node/model/fused.py over dot.c's es_decode_stage) and sequences ---------------------------


@pytest.fixture(scope="module")
def ckpt(smollm2_path):
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


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_fused_decode_matches_the_modules(fast_kernels: str, ckpt, quant: str) -> None:
    from edgeshard.node.model.config import ShardSpec
    from edgeshard.node.weights.loader import load_stage

    stage = load_stage(ckpt, ShardSpec.full(30), quant=quant)
    fused = stage.fused_decode()
    assert fused is not None and fused.kernel == fast_kernels
    prompt, steps = [1, 504, 3458, 282, 260, 1345, 30, 378], [5112, 314, 253, 1789, 282, 260]
    got = _decode([stage], prompt, steps)
    stage._fused = None  # the module path (the same kernels for the matmuls)
    modules = _decode([stage], prompt, steps)
    assert rel(got, modules) < 5e-2  # bf16 rounding in other places over 30 layers (int4 vs f32: ~4%)
    assert (got.argmax(-1) == modules.argmax(-1)).float().mean() >= 5 / 6
    stage.refresh_fused()
    assert torch.equal(_decode([stage], prompt, steps), got)  # rebuilt: deterministic


def test_decode_rows_do_not_depend_on_their_batch_threads_or_split(fast_kernels: str, ckpt) -> None:
    """A decode row gives bit-identical logits alone, batched with other decode rows and a prefill chunk,
    with two threads, and with the layers split over three stages."""
    from edgeshard.node.model.config import ShardSpec, even_split
    from edgeshard.node.model.decoder import Segment
    from edgeshard.node.weights.loader import load_stage

    stage = load_stage(ckpt, ShardSpec.full(30), quant="int4")
    a, b, c = [1, 504, 3458, 282], [1, 22, 2113, 17, 990], [1, 3458, 30, 378, 260, 5112, 314]
    alone = _decode([stage], a[:-1], a[-1:])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(_decode([stage], a[:-1], a[-1:]), alone)
        ca, cb, cc = stage.new_cache(64), stage.new_cache(64), stage.new_cache(64)
        stage(torch.tensor(a[:-1]), [Segment(ca, 0, len(a) - 1)])
        stage(torch.tensor(b[:-1]), [Segment(cb, 0, len(b) - 1)])
        mixed = stage(
            torch.tensor([b[-1], *c, a[-1]]),
            [Segment(cb, len(b) - 1, 1), Segment(cc, 0, len(c)), Segment(ca, len(a) - 1, 1)],
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(mixed[2:3], alone)
    split = [load_stage(ckpt, s, quant="int4") for s in even_split(30, 3)]
    assert torch.equal(_decode(split, a[:-1], a[-1:]), alone)


PROMPTS = [
    [1, 504, 3458, 282, 260, 1345, 30, 378],
    [1, 22, 2113, 17, 990],
    [1, 3458, 30, 378, 260, 5112, 314, 253, 1789],
    [1, 9226, 314],
    [1, 504, 2113, 17],
    [1, 260, 1345, 30, 378, 260],
    [1, 5112, 314, 253, 1789, 282, 260, 22, 990, 17],
    [1, 378, 260],
]


def _greedy_one_at_a_time(executor, prompt: list[int], tokens: int) -> list[int]:
    from edgeshard.node.model.executor import LocalPipeline
    from edgeshard.node.model.sampling import SamplingParams

    local = LocalPipeline([executor])
    local.open("solo", SamplingParams(temperature=0.0))
    out = [local.step("solo", 0, prompt)]
    while len(out) < tokens:
        out.append(local.step("solo", len(prompt) + len(out) - 1, [out[-1]]))
    local.close("solo")
    return out


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_eight_concurrent_greedy_sequences_equal_one_at_a_time(fast_kernels: str, ckpt, quant: str) -> None:
    """Eight sequences through one ShardExecutor, started one step apart so every batch mixes prefill
    chunks and decode rows of different lengths: each sequence's greedy tokens equal its solo run."""
    from edgeshard.node.model.config import ShardSpec
    from edgeshard.node.model.executor import ShardExecutor, StepRequest
    from edgeshard.node.model.sampling import SamplingParams
    from edgeshard.node.weights.loader import load_stage

    tokens = 8
    executor = ShardExecutor(load_stage(ckpt, ShardSpec.full(30), quant=quant))
    solo = [_greedy_one_at_a_time(executor, p, tokens) for p in PROMPTS]
    out: list[list[int]] = [[] for _ in PROMPTS]
    for i in range(len(PROMPTS)):
        executor.open_session(f"s{i}", SamplingParams(temperature=0.0), max_len=64)
    step = 0
    while any(len(o) < tokens for o in out):
        requests = []
        for i, (prompt, got) in enumerate(zip(PROMPTS, out)):
            if i > step or len(got) >= tokens:
                continue  # not started yet, or done
            ids, start = (prompt, 0) if not got else ([got[-1]], len(prompt) + len(got) - 1)
            requests.append(StepRequest(f"s{i}", start, tokens=torch.tensor(ids)))
        for res in executor.step(requests):
            out[int(res.session_id[1:])].append(res.token)
        step += 1
    assert out == solo
