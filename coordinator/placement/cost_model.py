"""The planner's cost model: what a placement is predicted to take, and whether it fits in memory.

Cost model (one decode step of one sequence, all in ms):

    stage compute   SERVING_FACTOR x (step_overhead + layers * layer_ms (+ embed on the first, + head and
                    sampling on the last)), from each node's benchmark (node/presence/capability.py) and the model's
                    per-layer bytes (node/model/cost.py); layer_ms = overhead + bytes / weight rate + KV read at
                    POSITION
    hops            the coordinator measures only its own round trip to each node (coordinator/placement/links.py), so
                    links are modelled as a star through the LAN switch: a hop a->b costs HOP_RTT x (rtt_a +
                    rtt_b)/2, the hops to the first and from the last node HOP_RTT x rtt. Summed over a ring of
                    k nodes that is HOP_RTT x (sum(rtt_i) + rtt_first/2 + rtt_last/2) (+ activation bytes /
                    bandwidth into each non-first node): every node's share is its own, the ends pay a bit more.
    latency         sum of stages + hops + the coordinator's own per-token work: the `latency` objective
    bottleneck      the slowest stage (compute + receiving its input): what bounds pipeline throughput when
                    many sequences are in flight; the `throughput` objective minimises it (then latency).

Memory: each stage's weights plus a KV cache for `context` positions x `sessions` must fit the node's usable
memory: what is free (plus what its current shard holds, freed on reload), less a reserve for the runtime
(5% of RAM, at most 256 MiB), capped by --memory-limit.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from edgeshard.coordinator.errors import PlanError
from edgeshard.coordinator.placement.links import DEFAULT_MBPS, Link
from edgeshard.coordinator.placement.plan import Plan, StagePlan
from edgeshard.node.model.cost import ModelCost
from edgeshard.node.presence.capability import Capability, format_bytes

POSITION = 64  # the decode position predictions are made at (attention reads this much KV cache)
COORDINATOR_MS = 0.6  # the coordinator's own work per token (generate loop, futures, gRPC write/read)
# Calibration (benchmarks/planner.py, three loopback nodes on a shared 2-core machine, results/planner.json):
# a node serving the ring computes ~35% slower than its idle microbenchmark said (median over the stages of
# six runs, spread 1.15-2.1x): its gRPC threads and the coordinator share the cores, and the messages between
# steps push weights out of the caches. A ring hop costs about one unary round trip, not half of one: only
# half is wire, but both ends run the message through Python (decode, queue, encode) as a unary call does.
# Separate boards see less contention; re-calibrate with the benchmark on the hardware you plan for.
SERVING_FACTOR = 1.35
HOP_RTT = 1.0  # what a ring hop costs, in unary round trips (see above)
DEFAULT_CONTEXT = 2048
OBJECTIVES = ("latency", "throughput")
_RESERVE_FRACTION, _RESERVE_MAX = 0.05, 256 << 20
# What a node that did not run the benchmark is assumed to do: the median of those that did, else these
# (a Raspberry Pi 4 class board at 1 thread, the pessimistic end of what edgeshard targets).
_FALLBACK = Capability(
    mem_gbps=3.0,
    int4_gbps=1.5,
    int8_gbps=2.0,
    bf16_gbps=1.5,
    f32_gbps=1.5,
    layer_overhead_ms=0.5,
    step_overhead_ms=0.2,
)
_SPEED_FIELDS = (
    "mem_gbps",
    "int4_gbps",
    "int8_gbps",
    "bf16_gbps",
    "f32_gbps",
    "layer_overhead_ms",
    "step_overhead_ms",
)


@dataclass(frozen=True)
class PlanNode:
    """A node as the planner sees it: speed, memory it may use, and the coordinator's link to it."""

    key: str  # unique: mDNS instance name, or the address for --peers
    name: str  # for humans
    address: str  # host:port
    capability: Capability
    available_bytes: int  # free now, plus what its current shard and KV hold (freed when it reloads)
    link: Link = Link(1.0, DEFAULT_MBPS, False)

    @property
    def usable_bytes(self) -> int:
        """Memory the planner may fill: available less the runtime's reserve, capped by --memory-limit."""
        total = self.capability.memory_total or self.available_bytes
        usable = max(0, self.available_bytes - int(min(_RESERVE_MAX, _RESERVE_FRACTION * total)))
        limit = self.capability.memory_limit
        return min(usable, limit) if limit else usable


def with_fallback_speeds(nodes: Sequence[PlanNode]) -> list[PlanNode]:
    """Nodes whose capability has no benchmark get the median figures of the others (or `_FALLBACK`)."""
    measured = [n.capability for n in nodes if n.capability.measured]
    if len(measured) == len(nodes):
        return list(nodes)
    figures = (
        {f: statistics.median(getattr(c, f) for c in measured) for f in _SPEED_FIELDS}
        if measured
        else {f: getattr(_FALLBACK, f) for f in _SPEED_FIELDS}
    )
    return [
        n
        if n.capability.measured
        else dataclasses.replace(n, capability=dataclasses.replace(n.capability, **figures))
        for n in nodes
    ]


class CostModel:
    """The per-node cost functions of one planning problem (shared by the search and by `evaluate`)."""

    def __init__(self, cost: ModelCost, context: int, sessions: int, position: int) -> None:
        self.cost, self.context, self.sessions, self.position = cost, context, sessions, position

    def memory(self, start: int, end: int) -> int:
        return self.cost.weight_bytes(start, end) + self.cost.kv_bytes(
            end - start, self.context, self.sessions
        )

    def compute_ms(self, node: PlanNode, start: int, end: int) -> float:
        return SERVING_FACTOR * node.capability.stage_ms(self.cost, start, end, self.position)

    def hop_ms(self, node: PlanNode, first: bool, last: bool) -> float:
        """This node's share of the ring's hop time (see the module docstring)."""
        r = HOP_RTT * node.link.rtt_ms  # half of the hop into the node and half of the hop out of it
        ms = r + (r / 2 if first else node.link.transfer_ms(self.cost.activation_bytes))
        return ms + (r / 2 if last else 0.0)  # the ends also pay the coordinator's half of their hop

    def stage(self, node: PlanNode, start: int, end: int) -> StagePlan:
        last = end == self.cost.num_layers
        compute = self.compute_ms(node, start, end)
        receive = 0.0 if start == 0 else node.link.transfer_ms(self.cost.activation_bytes)
        return StagePlan(
            node=node.name,
            key=node.key,
            address=node.address,
            start_layer=start,
            end_layer=end,
            weight_bytes=self.cost.weight_bytes(start, end),
            kv_bytes=self.cost.kv_bytes(end - start, self.context, self.sessions),
            usable_bytes=node.usable_bytes,
            compute_ms=round(compute, 4),
            hop_ms=round(self.hop_ms(node, start == 0, last), 4),
            stage_ms=round(compute + receive, 4),
        )


def evaluate(
    nodes: Sequence[PlanNode],
    counts: Sequence[int],
    cost: ModelCost,
    *,
    model: str = "",
    context: int = DEFAULT_CONTEXT,
    sessions: int = 1,
    objective: str = "latency",
    position: int = POSITION,
    left_out: Sequence[tuple[str, str]] = (),
) -> Plan:
    """The plan that gives `counts[i]` layers to `nodes[i]` in this order (0 leaves a node out).

    Raises PlanError when the counts do not add up to the model's layers or a node would run out of memory.
    """
    if len(counts) != len(nodes):
        raise PlanError(f"--layers gives {len(counts)} counts for {len(nodes)} nodes; give one per node")
    if any(c < 0 for c in counts) or sum(counts) != cost.num_layers:
        raise PlanError(
            f"--layers {','.join(map(str, counts))} must be non-negative and add up to the "
            f"model's {cost.num_layers} layers"
        )
    m = CostModel(cost, context, sessions, position)
    stages, start, over = [], 0, []
    for node, c in zip(nodes, counts, strict=True):
        if c == 0:
            continue
        stage = m.stage(node, start, start + c)
        if stage.weight_bytes + stage.kv_bytes > node.usable_bytes:
            over.append(
                f"{node.name} needs {format_bytes(stage.weight_bytes + stage.kv_bytes)} for layers "
                f"{start}-{start + c - 1} but may use {format_bytes(node.usable_bytes)}"
            )
        stages.append(stage)
        start += c
    if over:
        missing = sum(
            s.weight_bytes + s.kv_bytes - s.usable_bytes
            for s in stages
            if s.weight_bytes + s.kv_bytes > s.usable_bytes
        )
        raise PlanError(
            "this split does not fit: " + "; ".join(over) + ". Give those nodes fewer layers.",
            missing_bytes=missing,
        )
    latency = sum(s.compute_ms + s.hop_ms for s in stages) + COORDINATOR_MS
    slowest = max(stages, key=lambda s: s.stage_ms)
    return Plan(
        model=model,
        quant=cost.quant,
        num_layers=cost.num_layers,
        context=context,
        sessions=sessions,
        objective=objective,
        stages=tuple(stages),
        left_out=tuple(left_out),
        latency_ms=round(latency, 4),
        bottleneck_ms=slowest.stage_ms,
        bottleneck=slowest.node,
        coordinator_ms=COORDINATOR_MS,
    )
