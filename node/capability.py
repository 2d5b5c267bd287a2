"""What a node can do, as a value: memory, cores, and the speed its microbenchmark measured.

A decode step of one token is dominated by streaming every weight of a layer through a matmul kernel once,
plus a fixed cost per layer (norms, rotary, attention, and the dispatch of ~25 small ops). The node measures
exactly those at start (node/microbench.py), with its own thread count, and the estimate for a model is

    layer_ms = overhead + layer bytes / min(weight rate of the format, memory bandwidth) + KV read / bandwidth

(`Capability.layer_ms`). `Capability` travels in GetInfo (`fill_wire`/`from_wire`) and, abridged, in mDNS
TXT; `CapabilityMonitor` keeps it current on a machine whose load changes.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .cost import END_QUANT, ModelCost


@dataclass(frozen=True)
class Capability:
    """A node's resources and measured speed (the `Capabilities` of GetInfo, as a value)."""

    cores: int = 1  # logical CPUs of the machine
    threads: int = 1  # torch threads the node computes with
    arch: str = ""  # platform.machine(): x86_64, aarch64, armv7l
    memory_total: int = 0  # bytes of RAM
    memory_free: int = 0  # bytes available now (psutil's `available`)
    memory_limit: int = 0  # bytes the node may use for shards and KV (--memory-limit); 0: no limit
    mem_gbps: float = 0.0  # memory copy bandwidth, GB/s (read + write)
    int4_gbps: float = 0.0  # weight bytes per second through each format's matmul kernel, GB/s
    int8_gbps: float = 0.0
    bf16_gbps: float = 0.0
    f32_gbps: float = 0.0
    layer_overhead_ms: float = 0.0  # fixed cost of one decoder layer at decode, beyond streaming its weights
    step_overhead_ms: float = 0.0  # fixed cost of one step of a stage (positions, rotary tables, cache)
    bench_ms: float = 0.0  # how long the microbenchmark took

    @property
    def measured(self) -> bool:
        """The microbenchmark ran (an old node, or one with --no-benchmark, reports zeros)."""
        return self.int4_gbps > 0

    def weight_gbps(self, quant: str) -> float:
        """Effective GB/s of weights in `quant` for a layer: the kernel's rate, capped by memory bandwidth.

        A copy moves each byte twice (read and write), a matmul reads each weight once, so the read
        bandwidth that caps the kernel is about the copy figure (the copy's GB/s count both directions).
        """
        rate = getattr(self, f"{quant}_gbps", 0.0) or self.int4_gbps
        return min(rate, self.mem_gbps) if self.mem_gbps > 0 else rate

    def layer_ms(self, cost: ModelCost, position: int = 64) -> float:
        """Predicted ms of one decoder layer for one token at `position` (weights + reading the KV cache)."""
        gbps = self.weight_gbps(cost.quant)
        kv = 2 * position * cost.kv_bytes_per_token  # keys and values read by attention
        return self.layer_overhead_ms + cost.layer_bytes / (gbps * 1e6) + kv / (self.mem_gbps * 1e6)

    def head_ms(self, cost: ModelCost) -> float:
        """Predicted ms of the final norm, the output head and sampling for one token (last stage)."""
        logits = 3 * 4 * cost.vocab_size  # float32 logits written, converted, read by the sampler
        return (
            self.layer_overhead_ms / 4
            + cost.head_bytes / (self.weight_gbps(END_QUANT.get(cost.quant, cost.quant)) * 1e6)
            + logits / (self.mem_gbps * 1e6)
        )

    def embed_ms(self, cost: ModelCost) -> float:
        """Predicted ms of the embedding lookup (one row gathered and dequantized: a few small ops)."""
        return self.layer_overhead_ms / 8

    def stage_ms(self, cost: ModelCost, start: int, end: int, position: int = 64) -> float:
        """Predicted compute ms of a stage holding layers [start, end) for one decode step."""
        ms = self.step_overhead_ms + (end - start) * self.layer_ms(cost, position)
        if start == 0:
            ms += self.embed_ms(cost)
        if end == cost.num_layers:
            ms += self.head_ms(cost)
        return ms

    def to_dict(self) -> dict:
        """A JSON/msgpack-friendly dict (round-trips through `Capability(**d)`)."""
        return dataclasses.asdict(self)


def memory_snapshot() -> tuple[int, int]:
    """(total, available) bytes of RAM now."""
    import psutil

    mem = psutil.virtual_memory()
    return mem.total, mem.available


def measure(threads: int | None = None, memory_limit: int = 0, budget_s: float = 0.4) -> Capability:
    """Run the microbenchmark of node/microbench.py (about `budget_s` seconds) and describe this machine.

    `threads` sets torch's thread count first (None keeps the process's setting), so the figures are those
    of the node as it will compute.
    """
    from .microbench import run_microbenchmark

    return run_microbenchmark(threads, memory_limit, budget_s)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """'512M', '1.5G', '2GiB', '300MB', '1048576' -> bytes (K/M/G alone are binary units, like `free -h`)."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional unit like 512M or 2GiB") from None
    if unit not in _SIZE_UNITS or value < 0:
        raise ValueError(f"size {text!r}: use a number with K, M, G (binary) or KB, MB, GB (decimal)")
    return int(value * _SIZE_UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes for humans: 1.5 GiB, 300 MiB, 12 KiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


_BENCH_FIELDS = (
    "mem_gbps",
    "int4_gbps",
    "int8_gbps",
    "bf16_gbps",
    "f32_gbps",
    "layer_overhead_ms",
    "step_overhead_ms",
    "bench_ms",
)


def fill_wire(cap: Capability, out) -> None:
    """Add the memory limit and the benchmark figures of `cap` to a `pb.Capabilities` message (the server
    fills cores, threads and memory itself, fresh at every GetInfo)."""
    out.memory_limit = cap.memory_limit
    if cap.measured:
        for name in _BENCH_FIELDS:
            setattr(out.benchmark, name, getattr(cap, name))


def from_wire(caps) -> Capability:
    """A `Capability` from a `pb.Capabilities` message (zeros for figures an older node does not send)."""
    bench = (
        {name: getattr(caps.benchmark, name) for name in _BENCH_FIELDS} if caps.HasField("benchmark") else {}
    )
    return Capability(
        cores=caps.cores,
        threads=caps.torch_threads,
        arch=caps.arch,
        memory_total=caps.memory_total,
        memory_free=caps.memory_free,
        memory_limit=caps.memory_limit,
        **bench,
    )


class CapabilityMonitor:
    """The node's capability, re-measured while the node is idle and smoothed over the last few runs.

    A board that is also used for other things (an old laptop) or a shared machine is faster or slower from
    one minute to the next; one measurement at start would pin whatever happened in that second. So the node
    re-runs the microbenchmark every `every_s` seconds while it serves no steps, and reports the field-wise
    median of the last `keep` runs (memory figures are always read fresh).
    """

    def __init__(self, first: Capability, every_s: float = 300.0, keep: int = 5) -> None:
        self.runs: list[Capability] = [first]
        self.every_s, self.keep = every_s, keep

    @property
    def current(self) -> Capability:
        """The smoothed capability (median of the kept runs)."""
        if len(self.runs) == 1:
            return self.runs[0]
        figures = {f: statistics.median(getattr(c, f) for c in self.runs) for f in _BENCH_FIELDS}
        return dataclasses.replace(self.runs[-1], **figures)

    def add(self, cap: Capability) -> None:
        """Record one more run (the oldest is dropped beyond `keep`)."""
        self.runs = [*self.runs, cap][-self.keep :]

    async def run(self, is_idle: Callable[[], bool], on_update: Callable[[Capability], None]) -> None:
        """Re-measure every `every_s` seconds when `is_idle()` (in a worker thread: the node keeps serving),
        handing each new smoothed capability to `on_update`."""
        import asyncio

        while self.every_s:
            # +-20% jitter: nodes sharing a machine (tests, classroom mode) drift apart instead of measuring
            # each other's benchmark
            await asyncio.sleep(self.every_s * random.uniform(0.8, 1.2))
            if is_idle():
                self.add(await asyncio.to_thread(measure, None, self.runs[-1].memory_limit))
                on_update(self.current)


def start_remeasuring(servicer, every_s: float):
    """The task that keeps `servicer.capability` (node/server.py) current; None when `every_s` is 0.

    Idle means: no shard is loading and no step ran since the last look.
    """
    import asyncio

    if not every_s or not servicer.capability.measured:
        return None
    node, seen = servicer.node, [-1]

    def idle() -> bool:
        steps = node.shard.executor.steps if node.shard is not None else 0
        was, seen[0] = seen[0], steps
        return steps == was and not node.loading

    monitor = CapabilityMonitor(servicer.capability, every_s)
    return asyncio.create_task(monitor.run(idle, lambda cap: setattr(servicer, "capability", cap)))
