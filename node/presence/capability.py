"""What a node can do, as a value: memory, cores, and the speed its microbenchmark measured.

A decode step of one token is dominated by streaming every weight of a layer through a matmul kernel once,
plus a fixed cost per layer (norms, rotary, attention, and the dispatch of ~25 small ops). The node measures
exactly those at start (presence/microbench.py), with its own thread count, and the estimate for a model is

    layer_ms = overhead + layer bytes / min(weight rate of the format, memory bandwidth) + KV read / bandwidth

(`Capability.layer_ms`). `Capability` travels in GetInfo (`fill_wire`/`from_wire`) and, abridged, in mDNS
TXT; presence/monitor.py keeps it current on a machine whose load changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgeshard.node.model.cost import END_QUANT, ModelCost


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
