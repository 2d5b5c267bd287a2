"""The placement plan as a value: printed, compared, serialized (msgpack/JSON), and deployed.

A `Plan` says which node runs which contiguous layer range and what the planner predicts for it. It is made
by coordinator/placement/planner.py and consumed by `deploy()` (coordinator/pipeline/deploy.py) through `addresses()` and
`specs()`; nothing in it refers to live objects, so a plan can be stored, sent, and diffed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgpack

from edgeshard.node.model.config import ShardSpec
from edgeshard.node.presence.capability import format_bytes


@dataclass(frozen=True)
class StagePlan:
    """One stage: a node and its layer range, with what it holds and what it is predicted to take."""

    node: str  # name, for humans
    key: str  # unique node key (mDNS instance name, or the address)
    address: str  # host:port
    start_layer: int  # first layer (global index)
    end_layer: int  # one past the last layer
    weight_bytes: int  # weights of the shard (embedding/head included at the ends)
    kv_bytes: int  # KV cache budget for the plan's context and sessions
    usable_bytes: int  # memory the node may use
    compute_ms: float  # predicted compute of one decode step
    hop_ms: float  # this stage's share of the ring's network time per token
    stage_ms: float  # compute + receiving its input: what bounds throughput

    @property
    def layers(self) -> int:
        """How many layers the stage runs."""
        return self.end_layer - self.start_layer


@dataclass(frozen=True)
class Plan:
    """Nodes in pipeline order with their layer ranges, and the predicted speed of the whole."""

    model: str  # what the nodes load (name or file)
    quant: str  # weight format of every shard
    num_layers: int
    context: int  # positions of KV cache budgeted per session
    sessions: int  # sessions budgeted
    objective: str  # "latency" or "throughput"
    stages: tuple[StagePlan, ...]
    left_out: tuple[tuple[str, str], ...] = ()  # (node name, why it got no layers)
    latency_ms: float = 0.0  # predicted ms per token for one sequence (stages + hops + coordinator)
    bottleneck_ms: float = 0.0  # the slowest stage's ms per step
    bottleneck: str = ""  # ... and its node
    coordinator_ms: float = 0.0  # the coordinator's share of latency_ms
    even_split_ms: float | None = None  # predicted latency of an even split over all nodes (None: won't fit)

    @property
    def tok_per_s(self) -> float:
        """Predicted decode tokens per second of one sequence."""
        return 1000.0 / self.latency_ms if self.latency_ms else 0.0

    @property
    def throughput_tok_per_s(self) -> float:
        """Predicted tokens per second of the whole pipeline with enough sequences in flight."""
        return 1000.0 / self.bottleneck_ms if self.bottleneck_ms else 0.0

    def addresses(self) -> list[str]:
        """Node addresses in pipeline order."""
        return [s.address for s in self.stages]

    def specs(self) -> list[ShardSpec]:
        """The shard of each stage, in pipeline order."""
        return [ShardSpec(s.start_layer, s.end_layer, self.num_layers) for s in self.stages]

    def run_entries(self) -> list[dict]:
        """The plan as `run --json` reports it: `{node, address, start_layer, end_layer, quant, weight_bytes}`
        per stage (layer ranges are [start_layer, end_layer) everywhere: `plan --json`, `nodes --json`)."""
        return [
            {
                "node": s.node,
                "address": s.address,
                "start_layer": s.start_layer,
                "end_layer": s.end_layer,
                "quant": self.quant,
                "weight_bytes": s.weight_bytes,
            }
            for s in self.stages
        ]

    # ------------------------------------------------------------------------------------ serialization

    def to_dict(self) -> dict:
        """Plain dict (JSON and msgpack friendly); `Plan.from_dict` reverses it."""
        d = dataclasses.asdict(self)
        d["left_out"] = [list(x) for x in self.left_out]
        d["tok_per_s"] = round(self.tok_per_s, 2)
        d["plan"] = self.run_entries()  # the stages in the words of `run --json` and /v1/cluster
        d["throughput_tok_per_s"] = round(self.throughput_tok_per_s, 2)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """The plan `to_dict` described (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["stages"] = tuple(StagePlan(**s) for s in d["stages"])
        kw["left_out"] = tuple(tuple(x) for x in d.get("left_out", ()))
        return cls(**kw)

    def to_msgpack(self) -> bytes:
        """The plan as msgpack bytes."""
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes) -> Plan:
        """The plan packed by `to_msgpack`."""
        return cls.from_dict(msgpack.unpackb(data, raw=False))

    # ------------------------------------------------------------------------------------ explanation

    def explain(self) -> str:
        """The plan as text: one line per stage, then the prediction and the nodes left out."""
        lines = [
            f"{self.model or 'model'} ({self.quant}, {self.num_layers} layers, context {self.context} x "
            f"{self.sessions}), objective {self.objective}:"
        ]
        for i, s in enumerate(self.stages, 1):
            lines.append(
                f"  {i}. {s.node:<14} {s.address:<21} layers {s.start_layer:>3}-{s.end_layer - 1:<3} "
                f"({s.layers:>3})  {format_bytes(s.weight_bytes + s.kv_bytes):>10} of "
                f"{format_bytes(s.usable_bytes):>10}  compute {s.compute_ms:7.2f} ms  hop {s.hop_ms:5.2f} ms"
            )
        lines.append(
            f"  predicted: {self.latency_ms:.2f} ms/token = {self.tok_per_s:.1f} tok/s for one sequence; "
            f"bottleneck {self.bottleneck} {self.bottleneck_ms:.2f} ms/step "
            f"(pipeline up to {self.throughput_tok_per_s:.1f} tok/s)"
        )
        if self.even_split_ms is not None:
            lines.append(
                f"  even split over all nodes: {self.even_split_ms:.2f} ms/token "
                f"({1000 / self.even_split_ms:.1f} tok/s)"
            )
        for name, why in self.left_out:
            lines.append(f"  left out {name}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()
