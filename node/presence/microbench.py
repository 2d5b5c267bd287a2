"""The microbenchmark a node runs at start (and again while idle): the figures of `Capability`.

What it times, with the node's own thread count and the kernels the model runs (node/lowbit/layers.py):

  * weight rate per format: GB/s of weights through `Int4Linear`/`Int8Linear`/`F.linear` at batch 1 (bf16
    activations; f32 for f32), over a working set of 24 MB - bigger than the caches of a board or a laptop,
    as a stage of a model worth splitting is;
  * memory bandwidth: a 32 MB copy, the ceiling when weights stream from RAM;
  * the fixed cost of a layer and of a step: a real `Stage` of tiny layers (their matmuls cost nothing) at 1
    and at 4 layers; the slope is the per-layer cost, the intercept the per-step cost.

Each figure is timed in `ROUNDS` short windows (after one warm-up call each), the median of the runs in each
window, and then the median over the windows: a window disturbed by a burst of other work is an outlier and
is dropped.

Nodes sharing a machine (`cluster`, a classroom laptop running three nodes, tests) must not measure each other:
started at the same moment, each would time its kernels while the others' benchmarks take the same cores, and
report a speed many times too slow (the planner then puts every layer on one node). So a node benchmarks only
while it holds a machine-wide lock file (`bench_lock`), after a short random delay that spreads the start of
nodes launched together; the re-measurements of presence/monitor.py take the same lock.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeshard.node.presence.capability import Capability, memory_snapshot

BENCH_FORMATS = ("int4", "int8", "bf16", "f32")
ROUNDS = 3  # the benchmark's rounds; each figure is the median over them
START_JITTER_S = 0.3  # up to this random delay before taking the lock: nodes started together spread out
LOCK_WAIT_S = 120.0  # after this long waiting for the lock, measure anyway (a stuck holder must not block us)
QUIET_WAIT_S = 8.0  # holding the lock, wait up to this long for the other nodes here to calm down
QUIET_PERCENT = 30.0  # "calm": the other node processes use less than this percent of one core together
_MB = 1 << 20


def lock_path(state_dir: Path | None = None) -> Path:
    """The lock file nodes of one machine share while benchmarking.

    Machine-wide (the temp directory, per user) rather than per --state-dir: `cluster` gives each local node
    a state directory of its own, but they share the cores all the same. `state_dir` is only a fallback when
    the temp directory is not writable.
    """
    uid = os.getuid() if hasattr(os, "getuid") else 0
    where = Path(tempfile.gettempdir())
    if not os.access(where, os.W_OK) and state_dir is not None:
        where = Path(state_dir).expanduser()
    return where / f"edgeshard-microbench-{uid}.lock"


@contextlib.contextmanager
def bench_lock(path: Path | None = None, wait_s: float = LOCK_WAIT_S) -> Iterator[bool]:
    """Hold the machine's benchmark lock (an exclusive `flock`) for the duration; yields whether it was taken.

    Waits up to `wait_s` for another node's benchmark to finish, then goes on without it (False): a figure
    measured under load is better than a node that never starts. Without `fcntl` (Windows) it yields False.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path = path or lock_path()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield False
        return
    taken = False
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
                break
            except OSError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05 + random.random() * 0.05)
        yield taken
    finally:
        if taken:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _median_ms(fn: Callable[[], object], budget_s: float, min_runs: int = 3, rounds: int = ROUNDS) -> float:
    """Median over `rounds` windows of the median ms of `fn` in each (the windows share `budget_s`)."""
    return statistics.median(_window_ms(fn, budget_s / rounds, min_runs) for _ in range(max(1, rounds)))


def _window_ms(fn: Callable[[], object], budget_s: float, min_runs: int = 3) -> float:
    """Median ms of `fn` over repeats that together take about `budget_s` (after one warm-up call)."""
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 200:
            break
    return statistics.median(samples)


WORKING_SET = 24 * _MB  # weights streamed per format: beyond the last-level cache of a laptop or a board


def _weight_set(quant: str, total_bytes: int) -> list:
    """Distinct (1024 out x 2048 in) weights in format `quant`, together about `total_bytes`.

    Distinct copies, not one module called again and again, so the weights stream from memory as a real
    stage's layers do (a stage of a model worth splitting is bigger than any cache). The quantized module is
    made once and its buffers cloned: quantizing costs more than the whole benchmark.
    """
    import torch

    from edgeshard.node.lowbit.factory import lowbit_classes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=g) * 0.02
    if quant in ("int4", "int8"):  # the layers a stage builds here, so the rate is the node's own
        proto = _random_int4(1024, 2048) if quant == "int4" else lowbit_classes(2048)[1].from_float(w)
        return [proto] + [_clone_module(proto) for _ in range(max(2, total_bytes // proto.weight_bytes) - 1)]
    dtype = torch.bfloat16 if quant == "bf16" else torch.float32
    w = w.to(dtype)
    return [w] + [w.clone() for _ in range(max(2, total_bytes // (w.numel() * w.element_size())) - 1)]


def _random_int4(out_features: int, in_features: int):
    """An int4 layer of random 4-bit codes (packing codes directly skips the slow float quantization)."""
    import torch

    from edgeshard.node.lowbit.factory import lowbit_classes
    from edgeshard.node.lowbit.layers import GROUP_SIZE

    g = torch.Generator().manual_seed(out_features * 7919 + in_features)
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=g)
    scale = torch.full((out_features, in_features // GROUP_SIZE), 0.01)
    int4_cls = lowbit_classes(in_features)[0]
    return int4_cls.from_codes(iter([(codes, scale, -8 * scale)]), in_features, out_features)


def _clone_module(module):
    """A copy of a module with its own buffers (so the copies do not share cache lines)."""
    import copy

    twin = copy.copy(module)
    twin._buffers = {k: (v.clone() if v is not None else None) for k, v in module._buffers.items()}
    return twin


def _bench_weights(budget_s: float) -> dict[str, float]:
    """GB/s of weights through each format's kernel at batch 1 (bf16 activations; f32 for f32).

    One format at a time, its working set freed before the next: a 1 GB board never holds more than one.
    """
    import torch
    import torch.nn.functional as F

    rates = {}
    for quant in BENCH_FORMATS:
        mods = _weight_set(quant, WORKING_SET)
        if quant in ("int4", "int8"):
            x = torch.randn(1, mods[0].in_features).to(torch.bfloat16)
            nbytes = sum(m.weight_bytes for m in mods)

            def run(mods=mods, x=x) -> None:
                for m in mods:
                    m(x)
        else:
            x = torch.randn(1, mods[0].shape[1]).to(mods[0].dtype)
            nbytes = sum(t.numel() * t.element_size() for t in mods)

            def run(mods=mods, x=x) -> None:
                for t in mods:
                    F.linear(x, t)

        rates[quant] = nbytes / (_median_ms(run, budget_s) * 1e6)
        del mods, run
    return rates


def _bench_memory(budget_s: float) -> float:
    """GB/s of a 32 MB tensor copy (bytes read plus bytes written)."""
    import torch

    src = torch.ones(8 * _MB, dtype=torch.float32)  # 32 MB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (_median_ms(lambda: dst.copy_(src), budget_s) * 1e6)


def _bench_overheads(budget_s: float) -> tuple[float, float]:
    """(ms per layer, ms per step) of the fixed costs of a decode step, from a real Stage of tiny layers."""
    import torch

    from edgeshard.node.model.config import ModelConfig, ShardSpec
    from edgeshard.node.model.decoder import Segment, Stage

    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    times, protos = {}, {}
    for n in (1, 4):
        torch.manual_seed(0)
        stage = Stage(cfg, ShardSpec(1, 1 + n, cfg.num_hidden_layers), dtype=torch.bfloat16)
        for name, mod in list(stage.named_modules()):
            if isinstance(mod, torch.nn.Linear):  # the int4 module: the format whose dispatch we pay most
                parent, _, leaf = name.rpartition(".")
                if mod.weight.shape not in protos:
                    protos[mod.weight.shape] = _random_int4(*mod.weight.shape)
                setattr(stage.get_submodule(parent), leaf, _clone_module(protos[mod.weight.shape]))
        cache = stage.new_cache(256)
        x = torch.randn(1, cfg.hidden_size).to(torch.bfloat16)
        stage(
            torch.randn(32, cfg.hidden_size).to(torch.bfloat16), [Segment(cache, 0, 32)]
        )  # a prefilled prompt

        def step(stage=stage, cache=cache, x=x) -> None:
            stage(x, [Segment(cache, 32, 1)])  # rewrites position 32 each time: the cache stays the same size

        times[n] = _median_ms(step, budget_s / 2)
    per_layer = max((times[4] - times[1]) / 3, 1e-3)
    return per_layer, max(times[1] - per_layer, 0.0)


def run_microbenchmark(
    threads: int | None = None, memory_limit: int = 0, budget_s: float = 0.4
) -> Capability:
    """Run the microbenchmark (about `budget_s` seconds, well under one) and describe this machine.

    `threads` sets torch's thread count first (None keeps the process's setting), so the figures are those
    of the node as it will compute. The caller should hold the machine's lock (`measure` does).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with torch.inference_mode():
        mem_gbps = _bench_memory(budget_s * 0.1)
        rates = _bench_weights(budget_s * 0.5 / len(BENCH_FORMATS))
        per_layer, per_step = _bench_overheads(budget_s * 0.3)
    total, free = memory_snapshot()
    return Capability(
        cores=os.cpu_count() or 1,
        threads=torch.get_num_threads(),
        arch=platform.machine(),
        memory_total=total,
        memory_free=free,
        memory_limit=memory_limit,
        mem_gbps=round(mem_gbps, 3),
        int4_gbps=round(rates["int4"], 3),
        int8_gbps=round(rates["int8"], 3),
        bf16_gbps=round(rates["bf16"], 3),
        f32_gbps=round(rates["f32"], 3),
        layer_overhead_ms=round(per_layer, 4),
        step_overhead_ms=round(per_step, 4),
        bench_ms=round((time.perf_counter() - t0) * 1e3, 1),
    )


def measure(
    threads: int | None = None,
    memory_limit: int = 0,
    budget_s: float = 0.4,
    state_dir: Path | None = None,
    jitter_s: float = START_JITTER_S,
    quiet_wait_s: float = QUIET_WAIT_S,
) -> Capability:
    """Run the microbenchmark (about `budget_s` seconds) alone on this machine and describe it.

    A random delay of up to `jitter_s`, then the machine-wide lock (`bench_lock`) and up to `quiet_wait_s`
    for sibling nodes still busy starting: nodes started together measure one after the other instead of
    each other. `threads` sets torch's thread count first (None keeps
    the process's setting), so the figures are those of the node as it will compute.
    """
    if jitter_s > 0:
        time.sleep(random.uniform(0, jitter_s))
    with bench_lock(lock_path(state_dir)):
        wait_until_quiet(quiet_wait_s)
        return run_microbenchmark(threads, memory_limit, budget_s)


def wait_until_quiet(max_wait_s: float, sample_s: float = 0.3) -> float:
    """Wait (up to `max_wait_s`) while other edgeshard nodes on this machine are busy; the seconds waited.

    The lock keeps nodes from benchmarking at the same time, but a sibling started with us may still be
    importing torch or loading a shard: timing kernels then measures that, not the machine. Only node
    processes count (a machine busy with other work is measured as it is: that is the speed the node has).
    """
    import psutil

    t0 = time.monotonic()
    while time.monotonic() - t0 < max_wait_s:
        siblings = _node_processes()
        if not siblings:
            break
        for p in siblings:
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(None)
        time.sleep(sample_s)
        busy = 0.0
        for p in siblings:
            with contextlib.suppress(psutil.Error):
                busy += p.cpu_percent(None)
        if busy < QUIET_PERCENT:
            break
    return time.monotonic() - t0


def _node_processes() -> list:
    """The other edgeshard node processes of this machine (and user)."""
    import psutil

    me, found = os.getpid(), []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or ())
        if p.info["pid"] != me and ("edgeshard.node.service.server" in cmd or "edgeshard node" in cmd):
            found.append(p)
    return found
