"""Micro-benchmark of the linear-layer kernels a node can run, on the shapes of the demo model.

Prints a table of milliseconds per call (median over repeats, 1 thread) and writes the same figures to
benchmarks/results/kernels.json. Used to choose the kernels behind `node/lowbit/layers.py`:

    python benchmarks/kernels.py            # SmolLM2-135M shapes + 2048x2048, batch 1 and 8
    python benchmarks/kernels.py --quick    # fewer repeats (CI smoke)
    python benchmarks/kernels.py --crossover  # Int4Linear/Int8Linear: low-bit kernel vs dequantize + bf16
                                              # matmul by row count (sets dense_min_rows);
                                              # writes benchmarks/results/crossover.json
    python benchmarks/kernels.py --stage      # a batched decode step of the demo model's last 15 layers in
                                              # int4 (the native stage call) and its int8 head, by rows:
                                              # what batching costs; writes benchmarks/results/kernels-stage.json
    python benchmarks/kernels.py --stage --context 1000  # the same with 1000 tokens in each sequence
                                              # (attention's share grows with it): kernels-stage-ctx1000.json

Kernels (weights random; only speed is measured here, accuracy lives in tests/test_quant.py):
  fp32          F.linear, float32 activations and weights
  bf16          F.linear, bfloat16 activations and weights
  int8pack      torch._weight_int8pack_mm: int8 weights, one bf16 scale per output channel, bf16 activations
  fbgemm_int8   torch.ops.quantized.linear_dynamic: int8 per-channel weights, activations quantized to
                uint8 per call (fp32 in/out); x86-only (ARM boards get qnnpack instead)
  int4pack      torch._weight_int4pack_mm_for_cpu: 4-bit weights, group 32 bf16 scale+zero, bf16 activations
  amx_int8      node/lowbit/csrc/lowbit.c on AMX (what int8 layers run where native.amx()): same int8 format
  amx_int4      node/lowbit/csrc/lowbit.c on AMX: 4-bit weights, group 32 float32 scale+min, bf16 activations
                (both columns only on CPUs with AMX-BF16; see node/lowbit/native.py)
  dot_int8      node/lowbit/csrc/dot.c in the process's kernel set (AVX2, AVX-512, NEON; EDGESHARD_KERNELS forces
  dot_int4      one): the same formats, input rows quantized to int8 per 32, integer dot products
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, in_features, out_features): the linear layers of SmolLM2-135M plus a square reference layer.
SHAPES: list[tuple[str, int, int]] = [
    ("q/o 576->576", 576, 576),
    ("k/v 576->192", 576, 192),
    ("gate/up 576->1536", 576, 1536),
    ("down 1536->576", 1536, 576),
    ("head 576->49152", 576, 49152),
    ("ref 2048->2048", 2048, 2048),
]
BATCHES = (1, 4, 8, 16)  # rows: one decode step, and batched decode steps of several sequences
KERNELS = ("fp32", "bf16", "int8pack", "fbgemm_int8", "int4pack")
AMX_KERNELS = ("amx_int8", "amx_int4")
DOT_KERNELS = ("dot_int8", "dot_int4")
GROUP = 32


def _time_ms(
    fn: Callable[[], object], min_time_s: float, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median milliseconds per call of `fn`, each repeat running enough calls to last ~min_time_s."""
    fn()  # warm-up: first calls pay for allocation and kernel selection
    t0 = clock()
    fn()
    one = max(clock() - t0, 1e-6)
    calls = max(1, int(min_time_s / one))
    samples = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        samples.append((clock() - t0) / calls * 1e3)
    return statistics.median(samples)


def _make_kernels(in_f: int, out_f: int, batch: int) -> dict[str, Callable[[], object]]:
    """One closure per kernel computing y = x @ W.T for a random W (out_f, in_f) and x (batch, in_f)."""
    w = torch.randn(out_f, in_f) * 0.02
    x32 = torch.randn(batch, in_f)
    x16 = x32.to(torch.bfloat16)
    w16 = w.to(torch.bfloat16)

    # int8 per output channel, symmetric
    s8 = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
    q8 = torch.round(w / s8[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    s8_16 = s8.to(torch.bfloat16)
    qw = torch.quantize_per_channel(w, s8, torch.zeros(out_f, dtype=torch.long), 0, torch.qint8)
    packed_fbgemm = torch.ops.quantized.linear_prepack(qw, None)

    # int4 group-wise asymmetric (like GGUF Q4_1): value = (q - 8) * scale + zero
    g = w.reshape(out_f, in_f // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)  # (out, in/G)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q4 = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).reshape(out_f, in_f).to(torch.int32)
    packed4 = torch._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    kernels = {
        "fp32": lambda: F.linear(x32, w),
        "bf16": lambda: F.linear(x16, w16),
        "int8pack": lambda: torch._weight_int8pack_mm(x16, q8, s8_16),
        "fbgemm_int8": lambda: torch.ops.quantized.linear_dynamic(x32, packed_fbgemm),
        "int4pack": lambda: torch._weight_int4pack_mm_for_cpu(x16, packed4, GROUP, sz),
    }
    from edgeshard.node.lowbit import native

    if native.amx():
        codes8, (codes4, params4) = native.pack_int8(q8), native.pack_int4(q4, scale, lo)
        kernels["amx_int8"] = lambda: native.int8_mm(x16, codes8, s8_16)
        kernels["amx_int4"] = lambda: native.int4_mm(x16, codes4, params4, out_f)
    elif (
        native.available()
    ):  # the dot-product kernels of node/lowbit/csrc/dot.c, in the set this process uses
        name = native.kernel_set()
        pad = torch.zeros(native.padded(out_f) - out_f, in_f, dtype=q8.dtype)
        dot8 = native.pack_dot_int8(torch.cat([q8, pad]))
        dot4, dparams4 = native.pack_dot_int4(
            torch.cat([q4, pad.to(q4.dtype)]).to(torch.uint8),
            torch.cat([scale, torch.ones(pad.shape[0], scale.shape[1])]),
            torch.cat([lo, torch.zeros(pad.shape[0], lo.shape[1])]),
        )
        kernels["dot_int8"] = lambda: native.dot_int8_mm(name, x16, dot8, s8_16)
        kernels["dot_int4"] = lambda: native.dot_int4_mm(name, x16, dot4, dparams4, out_f)
    return kernels


CROSSOVER_ROWS = (1, 4, 8, 16, 24, 32, 48, 64, 128, 512)


def crossover(min_time_s: float, repeats: int, out: Path) -> None:
    """Time Int4Linear/Int8Linear forward through the kernel and through the dense path, by rows.

    Process CPU time, not wall time: on a shared machine it leaves out the time other processes hold the
    core (the run is single-threaded, so CPU time is the work done).
    """
    from edgeshard.node.lowbit import layers as quant

    print(f"ms per forward (CPU time), {torch.get_num_threads()} thread(s): kernel / dequantize+bf16 matmul")
    print(f"{'shape':<20}{'fmt':>6}" + "".join(f"{r:>14}" for r in CROSSOVER_ROWS))
    rows = []
    for name, in_f, out_f in SHAPES[:4]:
        w = torch.randn(out_f, in_f) * 0.02
        for fmt, layer in (
            ("int4", quant.Int4Linear.from_float(w)),
            ("int8", quant.Int8Linear.from_float(w)),
        ):
            cells, line = {}, ""
            for r in CROSSOVER_ROWS:
                x = torch.randn(r, in_f, dtype=torch.bfloat16)
                ms = {}
                for path, threshold in (("kernel", 1 << 30), ("dense", 0)):
                    type(layer).dense_min_rows = threshold  # read by forward at call time
                    ms[path] = _time_ms(functools.partial(layer, x), min_time_s, repeats, time.process_time)
                cells[r] = ms
                line += f"{ms['kernel']:>7.3f}/{ms['dense']:<6.3f}"
            rows.append({"shape": name, "format": fmt, "ms_by_rows": cells})
            print(f"{name:<20}{fmt:>6}" + line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


STAGE_ROWS = (1, 2, 4, 8, 16)


def _stage_step(st, fused, s: int, context: int, repeats: int) -> tuple[float, float]:
    """(ms of the stage call, ms of the head) for s rows of sequences `context` tokens in."""
    from edgeshard.node.model.config import FULL
    from edgeshard.node.model.decoder import Segment

    caches = [st.new_cache(context + 8) for _ in range(s)]
    for c in caches:  # the context, through the modules (a prefill)
        st(torch.randn(context, st.config.hidden_size), [Segment(c, 0, context)])
    x = torch.randn(s, st.config.hidden_size)
    tables = st.rotary.tables([Segment(c, context, 1) for c in caches], st.dtype)[FULL]
    cos, sin = (t.reshape(s, -1).contiguous() for t in tables)
    xh = torch.randn(s, st.config.hidden_size, dtype=torch.bfloat16)
    layers = _time_ms(
        lambda: fused.run(x.clone(), caches, [context] * s, cos, sin), 0.1, repeats, time.thread_time
    )
    head = _time_ms(functools.partial(st.lm_head, xh), 0.1, repeats, time.thread_time)
    return layers, head


def stage(repeats: int, out: Path, quant: str, context: int) -> None:
    """One decode step of S rows through a stage of the demo model's layers 15-29 (the native whole-stage
    call, node/model/fused.py) and through its output head, S = STAGE_ROWS, each sequence `context` tokens
    in. Thread CPU time (the calls run on this thread with 1 torch thread), so other work on a shared
    machine does not count; the ratio to one row is what batching costs."""
    from edgeshard.node.lowbit import native
    from edgeshard.node.model.config import ShardSpec
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.loader import load_stage
    from edgeshard.node.weights.registry import pull

    st = load_stage(open_checkpoint(pull("smollm2-135m")), ShardSpec(15, 30, 30), quant=quant)
    fused = st.fused_decode()
    if fused is None:
        raise SystemExit(f"no native stage call for these layers ({native.status()})")
    print(f"ms per decode step (thread CPU time), layers 15-29 in {quant}, {context} tokens of context, "
          f"{torch.get_num_threads()} thread(s); {native.status()}")  # fmt: skip
    print(f"{'rows':>5}{'15 layers':>11}{'x 1 row':>9}{'head':>9}{'x 1 row':>9}{'ms/row':>9}")
    rows, first = [], None
    for s in STAGE_ROWS:
        layers, head = _stage_step(st, fused, s, context, repeats)
        first = first or (layers, head)
        rows.append({"rows": s, "layers_ms": layers, "head_ms": head})
        print(f"{s:>5}{layers:>11.2f}{layers / first[0]:>9.2f}{head:>9.2f}{head / first[1]:>9.2f}"
              f"{(layers + head) / s:>9.2f}")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"quant": quant, "context": context, "threads": torch.get_num_threads(), "native": native.status(),
            "machine": platform.machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    """Run the benchmark, print the table and write the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer and shorter repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core figures)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    ap.add_argument("--crossover", action="store_true", help="kernel vs dense path of the quantized layers")
    ap.add_argument("--stage", action="store_true", help="a batched decode step of 15 layers + head, by rows")
    ap.add_argument("--quant", default="int4", help="--stage: the layers' format (int4, int8)")
    ap.add_argument("--context", type=int, default=60, help="--stage: tokens already in each sequence")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    min_time_s, repeats = (0.02, 3) if args.quick else (0.1, 5)
    if args.crossover:
        crossover(min_time_s, repeats, args.out.with_name("crossover.json"))
        return
    if args.stage:  # one file per context: kernels-stage.json (60 tokens), kernels-stage-ctx250.json, ...
        name = "kernels-stage.json" if args.context == 60 else f"kernels-stage-ctx{args.context}.json"
        stage(repeats, args.out.with_name(name), args.quant, args.context)
        return

    from edgeshard.node.lowbit import native

    names = KERNELS + (AMX_KERNELS if native.amx() else DOT_KERNELS if native.available() else ())
    rows = []
    header = f"{'shape':<20}{'batch':>6}" + "".join(f"{k:>13}" for k in names)
    print(f"ms per call, {args.threads} thread(s), torch {torch.__version__}, {platform.machine()}")
    print(f"low-bit kernels: {native.status()}")
    print(header)
    print("-" * len(header))
    for name, in_f, out_f in SHAPES:
        for batch in BATCHES:
            kernels = _make_kernels(in_f, out_f, batch)
            ms = {k: _time_ms(fn, min_time_s, repeats) for k, fn in kernels.items()}
            rows.append({"shape": name, "in": in_f, "out": out_f, "batch": batch, "ms": ms})
            print(f"{name:<20}{batch:>6}" + "".join(f"{ms[k]:>13.4f}" for k in names))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": args.threads,
        "group_size": GROUP,
        "quantized_engine": torch.backends.quantized.engine,
        "native": native.status(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
