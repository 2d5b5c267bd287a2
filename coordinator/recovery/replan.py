"""Where the ring goes after a failure: replace the lost nodes, else re-split, else say what is missing.

`Replanner.place` probes every candidate node (the --peers, or what discovery knows, plus the nodes of the
running plan), asks the live ones for GetInfo, and takes the first of these that fits memory:

1. replace: every stage whose node is lost goes to an idle live node (a spare, a node the planner left out,
   one that restarted) that can hold it; surviving stages keep their layers. A node asked to load the shard
   it holds only takes the new plan id (node/service/shard_load.py), so only the replacements load, and the numbers
   stay bit-identical to the uninterrupted run in every weight format. A node that restarted at the address
   of its stage simply takes its stage again.
2. re-split over every live node: an even split in candidate order when `even` (what --peers without
   --layers means) and it fits, else the split that the cost model predicts fastest among those that give
   every live node at least one layer and fit its memory (`split_over_all`). Every survivor keeps working:
   the planner alone, optimising latency on a cost model without contention, put all 30 layers on one of
   two survivors, leaving the other idle and its memory unused;
3. plan: the planner's best placement over the live nodes (coordinator/placement/planner.py), when no split over all
   of them fits (it may leave nodes out, saying why);
4. nothing fits: `CapacityError`, naming the nodes left, the memory missing and the node to add.

Nodes that come back (or join) are balanced in when the cost model says the ring gets faster
(`Replanner.better`, run by the ResilientPipeline between requests): the placement over every live node,
as a re-split would make it, against the running plan evaluated on the same nodes, by at least
`REBALANCE_GAIN`.

Only a re-split or a new plan moves layer boundaries; in bf16/int4 a boundary rounds the residual stream to
bf16 (node/model/decoder.py), so only f32 shards are then bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from edgeshard.coordinator.discovery.members import Member, confirm
from edgeshard.coordinator.errors import CapacityError, PlanError
from edgeshard.coordinator.placement.cost_model import (
    POSITION,
    CostModel,
    PlanNode,
    evaluate,
    with_fallback_speeds,
)
from edgeshard.coordinator.placement.gather import plan_node
from edgeshard.coordinator.placement.links import DEFAULT_MBPS, Link
from edgeshard.coordinator.placement.plan import Plan
from edgeshard.coordinator.placement.planner import DEFAULT_CONTEXT, make_plan
from edgeshard.coordinator.recovery.liveness import PROBE_TIMEOUT_S, Probe, probe_all
from edgeshard.node.model.config import even_split
from edgeshard.node.model.cost import ModelCost
from edgeshard.node.presence.capability import format_bytes

CONFIRM_TIMEOUT_S = 2.0
REBALANCE_GAIN = 0.10  # a re-balance must be predicted this much faster (a reload costs the load's seconds)
Candidates = Callable[[], Awaitable[Sequence[str]]]  # addresses that may serve (order: preference)


@dataclass(frozen=True)
class Placement:
    """A new plan for the ring and how it came about."""

    plan: Plan
    action: str  # for humans: "replaced node2 by node4", "re-split over 2 nodes", ...
    probes: tuple[Probe, ...]  # every candidate, as found while placing


class Replanner:
    """Makes the plan that follows a failure (see the module docstring for the order of preference).

    `candidates` lists the nodes that may serve (a fixed list, or a coroutine function asking discovery);
    the nodes of the running plan are always candidates too. `context` x `sessions` positions of KV cache
    are budgeted per stage, as the planner does. `even` re-splits evenly before asking the planner (the
    --peers default); without it the planner places every re-split.
    """

    def __init__(
        self,
        candidates: Sequence[str] | Candidates,
        cost: ModelCost,
        *,
        model: str = "",
        context: int = DEFAULT_CONTEXT,
        sessions: int = 1,
        objective: str = "latency",
        even: bool = True,
        probe_timeout: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.candidates = candidates
        self.cost = cost
        self.model = model
        self.context, self.sessions, self.objective = context, sessions, objective
        self.even = even
        self.probe_timeout = probe_timeout
        self.probes: tuple[Probe, ...] = ()  # what the last `place` found, also when nothing fit

    async def place(self, current: Sequence[dict]) -> Placement:
        """The next plan, given the running one (`Deployment.plan` entries); CapacityError when none fits."""
        given = self.candidates if not callable(self.candidates) else await self.candidates()
        addresses = list(dict.fromkeys([*(s["address"] for s in current), *given]))
        probes = self.probes = tuple(await probe_all(addresses, None, self.probe_timeout))
        live = [p.address for p in probes if p.answers]
        members = [m for m in await _confirm_all(live) if m.ok]  # GetInfo: same protocol and cluster
        return self.choose(current, members, probes)

    def choose(self, current: Sequence[dict], members: Sequence[Member], probes=()) -> Placement:
        """The placement over the live `members` (confirmed, in order of preference), given the running plan."""
        nodes = with_fallback_speeds([plan_node(m, _LINK) for m in members])  # unbenchmarked: median speeds
        names = {m.address: m.name for m in members}
        lost = [f"{s['node']} ({s['address']})" for s in current if s["address"] not in names]
        try:
            return self._replace(current, nodes, tuple(probes)) or self._resplit(nodes, tuple(probes))
        except PlanError as e:
            raise _capacity(e, lost, list(members), self.cost, self.model) from None

    async def place_better(self, current: Sequence[dict]) -> Placement | None:
        """Probe the candidates; `better` over the live ones (None: nothing to gain, or a node is down)."""
        given = self.candidates if not callable(self.candidates) else await self.candidates()
        addresses = list(dict.fromkeys([*(s["address"] for s in current), *given]))
        if len(addresses) == len(current):
            return None  # no node outside the plan: nothing to balance in
        probes = self.probes = tuple(await probe_all(addresses, None, self.probe_timeout))
        live = [p.address for p in probes if p.answers]
        members = [m for m in await _confirm_all(live) if m.ok]
        return self.better(current, members, probes)

    def better(self, current: Sequence[dict], members: Sequence[Member], probes=()) -> Placement | None:
        """A placement over every live member that the cost model predicts at least REBALANCE_GAIN faster
        (latency, or the bottleneck for `throughput`) than the running plan on the same figures; None when
        no node outside the plan is live, a node of the plan is not (that is a failure, not ours), or the
        gain is smaller."""
        nodes = with_fallback_speeds([plan_node(m, _LINK) for m in members])
        by_address = {n.address: n for n in nodes}
        running = {s["address"] for s in current}
        if any(a not in by_address for a in running) or all(n.address in running for n in nodes):
            return None
        m = CostModel(self.cost, self.context, self.sessions, POSITION)
        order = [_holding(by_address[s["address"]], m, s["start_layer"], s["end_layer"]) for s in current]
        counts = [s["end_layer"] - s["start_layer"] for s in current]
        try:
            now = evaluate(order, counts, self.cost, **self._kw())
            candidate = self._resplit(nodes, tuple(probes))
        except PlanError:
            return None
        if len(candidate.plan.stages) <= len(current):
            return None  # the nodes that came back would not be used: nothing to balance in

        def figure(plan: Plan) -> float:
            return plan.bottleneck_ms if self.objective == "throughput" else plan.latency_ms

        if figure(candidate.plan) > figure(now) * (1 - REBALANCE_GAIN):
            return None
        action = (
            f"balanced in {len(candidate.plan.stages) - len(current)} node(s): predicted "
            f"{figure(candidate.plan):.1f} ms per token instead of {figure(now):.1f} ({candidate.action})"
        )
        return Placement(candidate.plan, action, tuple(probes))

    def _kw(self) -> dict:
        return dict(model=self.model, context=self.context, sessions=self.sessions, objective=self.objective)

    def _replace(self, current: Sequence[dict], nodes: list[PlanNode], probes) -> Placement | None:
        """The running plan with each lost stage on an idle node that can hold it; None when one cannot."""
        by_address = {n.address: n for n in nodes}
        idle = [n for n in nodes if n.address not in {s["address"] for s in current}]
        m = CostModel(self.cost, self.context, self.sessions, POSITION)
        order, counts, swaps = [], [], []
        for s in current:
            start, end = s["start_layer"], s["end_layer"]
            node = by_address.get(s["address"])
            if node is not None:
                node = _holding(node, m, start, end)
            else:
                node = next((n for n in idle if n.usable_bytes >= m.memory(start, end)), None)
                if node is None:
                    return None
                idle.remove(node)
                swaps.append(f"{s['node']} by {node.name}")
            order.append(node)
            counts.append(end - start)
        try:
            plan = evaluate(order, counts, self.cost, **self._kw())
        except PlanError:
            return None
        action = f"replaced {', '.join(swaps)}" if swaps else "reloaded the same plan"
        return Placement(plan, action, probes)

    def _resplit(self, nodes: list[PlanNode], probes) -> Placement:
        """A split over every live node (evenly when `even` and it fits, else the predicted fastest that
        fits), else the planner's (PlanError: nothing fits)."""
        if not nodes:
            raise PlanError("no node is left")
        if self.even and len(nodes) <= self.cost.num_layers:
            counts = [s.end_layer - s.start_layer for s in even_split(self.cost.num_layers, len(nodes))]
            try:
                plan = evaluate(nodes, counts, self.cost, **self._kw())
                return Placement(plan, f"re-split the layers evenly over {len(nodes)} node(s)", probes)
            except PlanError:
                pass  # an even split does not fit: one that gives the big nodes more may
        m = CostModel(self.cost, self.context, self.sessions, POSITION)
        counts = split_over_all(nodes, m, self.objective)
        if counts is not None:
            plan = evaluate(nodes, counts, self.cost, **self._kw())
            return Placement(plan, f"re-split the layers over all {len(nodes)} live node(s)", probes)
        plan = make_plan(nodes, self.cost, **self._kw())
        return Placement(plan, f"re-planned over {len(plan.stages)} node(s)", probes)


def split_over_all(nodes: Sequence[PlanNode], m: CostModel, objective: str = "latency") -> list[int] | None:
    """Layer counts that give every node of `nodes` (in this order) at least one layer and fit each one's
    memory, with the least predicted time per token (`latency`: the sum of the stages; `throughput`: the
    slowest stage) under the planner's cost model; None when no such split fits (or there are more nodes
    than layers). An exact dynamic program over (node, layers placed): O(nodes x layers^2) stage costs."""
    total, n = m.cost.num_layers, len(nodes)
    if not n or n > total:
        return None
    inf = float("inf")
    best = [[inf] * (total + 1) for _ in range(n + 1)]  # best[i][k]: first i nodes hold layers [0, k)
    took = [[0] * (total + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for i, node in enumerate(nodes):
        left_after = n - i - 1  # nodes still to come, one layer each at least
        for start in range(i, total - left_after):
            if best[i][start] == inf:
                continue
            ends = [total] if left_after == 0 else range(start + 1, total - left_after + 1)
            for end in ends:
                if m.memory(start, end) > node.usable_bytes:
                    break  # more layers only need more memory
                stage = m.stage(node, start, end)
                if objective == "latency":
                    value = best[i][start] + stage.compute_ms + stage.hop_ms
                else:
                    value = max(best[i][start], stage.stage_ms)
                if value < best[i + 1][end]:
                    best[i + 1][end], took[i + 1][end] = value, end - start
    if best[n][total] == inf:
        return None
    counts, k = [], total
    for i in range(n, 0, -1):
        counts.append(took[i][k])
        k -= took[i][k]
    return counts[::-1]


def _holding(node: PlanNode, m: CostModel, start: int, end: int) -> PlanNode:
    """`node` as able to hold layers [start, end): it ran them until now (or restarted right there),
    whatever its free memory says now (its shard and KV caches are counted as used there)."""
    return dataclasses.replace(
        node,
        capability=dataclasses.replace(node.capability, memory_limit=0),
        available_bytes=max(node.available_bytes, m.memory(start, end) + _HOLDS_IT),
    )


_LINK = Link(1.0, DEFAULT_MBPS, False)  # links are not re-measured in a recovery: the planner's default
_HOLDS_IT = 512 << 20  # headroom above a stage a node already holds (more than the planner's runtime reserve)


async def _confirm_all(addresses: Sequence[str]) -> list[Member]:
    return list(
        await asyncio.gather(*(confirm(a, a, "peers", None, None, CONFIRM_TIMEOUT_S) for a in addresses))
    )


def _capacity(
    e: PlanError, lost: list[str], members: list[Member], cost: ModelCost, model: str
) -> CapacityError:
    """The planner's PlanError as the user sees it after a failure: what is gone, what is left, what to add."""
    gone = f"{', '.join(lost)} {'is' if len(lost) == 1 else 'are'} gone" if lost else "nodes failed"
    what = f"{model or 'the model'} ({cost.num_layers} layers, {cost.quant})"
    if not members:
        return CapacityError(
            f"{gone} and no node is left to hold {what}: restart `edgeshard node` on the lost boards or add "
            f"nodes with at least {format_bytes(cost.total_weight_bytes)} of memory in total"
        )
    left = ", ".join(f"{m.name} ({m.address})" for m in members)
    return CapacityError(f"{gone}; the node(s) left, {left}, cannot hold {what}: {e}", e.missing_bytes)
