"""Placement: which nodes run which contiguous layer ranges, chosen to minimise predicted time per token.

The cost of a placement is coordinator/placement/cost_model.py's; this module searches for the best one.

Search: under this model a stage's cost depends only on its node and layer count, and on whether it is the
first or the last stage; the order of the middle nodes changes nothing. So the planner tries every (first,
last) pair of nodes and, for each, runs an exact DP over the layer counts of the other nodes (each takes a
contiguous range or none). That is O(N^3 L^2) elementary steps, done as O(N^3) numpy min-plus products of
(L+1)^2: well under a second for 16 nodes and 100 layers. Leaving a node out is one of the DP's choices, so a
node that only adds a hop (slow, or not needed for memory) is left out, with the reason in the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from edgeshard.coordinator.errors import PlanError
from edgeshard.coordinator.placement.cost_model import (
    COORDINATOR_MS,
    DEFAULT_CONTEXT,
    OBJECTIVES,
    POSITION,
    CostModel,
    PlanNode,
    evaluate,
    with_fallback_speeds,
)
from edgeshard.coordinator.placement.plan import Plan
from edgeshard.node.model.cost import ModelCost
from edgeshard.node.presence.capability import format_bytes

__all__ = ["COORDINATOR_MS", "DEFAULT_CONTEXT", "OBJECTIVES", "PlanNode", "evaluate", "make_plan"]


def _node_vectors(
    m: CostModel, node: PlanNode, first: bool, last: bool, objective: str, bound: float
) -> np.ndarray:
    """Cost of `node` holding c = 0..L layers in this position (inf: does not fit, or above `bound`)."""
    num_layers = m.cost.num_layers
    out = np.full(num_layers + 1, np.inf)
    for c in range(1, num_layers + 1):
        # where the range sits only matters at the ends (embedding, head); a middle range starts at 1
        start = 0 if first else num_layers - c if last else 1
        end = start + c
        if (start == 0) != first or (end == num_layers) != last or end > num_layers:
            continue
        if m.memory(start, end) > node.usable_bytes:
            break  # more layers only need more memory
        stage = m.stage(node, start, end)
        if stage.stage_ms > bound:
            break  # nor are they ever faster
        out[c] = stage.compute_ms + stage.hop_ms if objective == "latency" else stage.stage_ms
    return out


def _dp(first: np.ndarray, middles: list[np.ndarray], last: np.ndarray, op) -> tuple[float, list[int]]:
    """Exact best over layer counts: `first` takes >= 1, each middle 0 or more, `last` the rest (>= 1).

    Each vector holds a node's cost for 0..L layers (inf: impossible). `op` combines costs (np.add for
    latency, np.maximum for the bottleneck). Returns (value, counts in the order first, middles..., last).
    """
    n = len(first) - 1  # layers
    f = first.copy()  # f[k]: best cost of placing layers [0, k) on the nodes seen so far
    f[0] = np.inf
    k = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    valid = (c >= 1) & (c <= k)
    choices = []  # per middle node: how many layers it took to reach each k (0: left out)
    for vec in middles:
        vals = np.where(valid, op(f[np.clip(k - c, 0, n)], vec[c]), np.inf)  # (L+1, L+1): [k, c]
        best_c = np.argmin(vals, axis=1)
        best = vals[np.arange(n + 1), best_c]
        take = best < f
        choices.append(np.where(take, best_c, 0))
        f = np.where(take, best, f)
    js = np.arange(1, n + 1)
    totals = np.concatenate([[np.inf], op(f[n - js], last[js])])  # the last node takes j layers
    j = int(np.argmin(totals))
    rest, counts = n - j, []
    for ch in reversed(choices):
        counts.append(int(ch[rest]))
        rest -= counts[-1]
    return float(totals[j]), [rest, *reversed(counts), j]


def _search(m: CostModel, nodes: list[PlanNode], objective: str, bound: float = np.inf):
    """Best (value, node order, counts) over every (first, last) pair; None when nothing fits."""
    op = np.add if objective == "latency" else np.maximum
    # each node's cost vector in each role, computed once: (first, last) = (T,T) alone, (T,F), (F,F), (F,T)
    vec = {
        (i, role): _node_vectors(m, n, *role, objective, bound)
        for i, n in enumerate(nodes)
        for role in ((True, True), (True, False), (False, False), (False, True))
    }
    best = None
    for a, na in enumerate(nodes):
        for b, nb in enumerate(nodes):
            if a == b:
                cand = (float(vec[a, (True, True)][-1]), [na], [m.cost.num_layers])
            else:
                mids = [i for i in range(len(nodes)) if i not in (a, b)]
                value, counts = _dp(
                    vec[a, (True, False)], [vec[i, (False, False)] for i in mids], vec[b, (False, True)], op
                )
                cand = (value, [na, *(nodes[i] for i in mids), nb], counts)
            if np.isfinite(cand[0]) and (best is None or cand[0] < best[0] - 1e-12):
                best = cand
    return best


def make_plan(
    nodes: Sequence[PlanNode],
    cost: ModelCost,
    *,
    model: str = "",
    context: int = DEFAULT_CONTEXT,
    sessions: int = 1,
    objective: str = "latency",
    layers: Sequence[int] | None = None,
    position: int = POSITION,
) -> Plan:
    """The plan with the least predicted time per token (or bottleneck, for `throughput`) that fits memory.

    `layers` overrides the search with explicit counts per node in the given order. The plan records the
    even split's prediction (all nodes, given order) for comparison. Raises PlanError, saying how much
    memory is missing and what to add, when the model cannot fit.
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not nodes:
        raise PlanError("no nodes to plan with: start `edgeshard node` on each board, or pass --peers")
    if len({n.key for n in nodes}) != len(nodes):
        raise PlanError("a node is listed twice; give each node once")
    nodes = with_fallback_speeds(nodes)
    kw = dict(model=model, context=context, sessions=sessions, objective=objective, position=position)
    even = _even_split_ms(nodes, cost, kw)
    if layers is not None:
        return dataclasses.replace(evaluate(nodes, layers, cost, **kw), even_split_ms=even)
    m = CostModel(cost, context, sessions, position)
    bound = np.inf
    if objective == "throughput":  # least bottleneck first, then the least latency among those plans
        found = _search(m, list(nodes), "throughput")
        bound = found[0] * (1 + 1e-9) if found else bound
    found = _search(m, list(nodes), "latency", bound)
    if found is None:
        raise _no_fit(nodes, m)
    _, order, counts = found
    used = {n.key for n, c in zip(order, counts, strict=True) if c}
    left = tuple((n.name, _why_left_out(m, n, order, counts)) for n in nodes if n.key not in used)
    plan = evaluate(order, counts, cost, left_out=left, **kw)
    return dataclasses.replace(plan, even_split_ms=even)


def _even_split_ms(nodes: Sequence[PlanNode], cost: ModelCost, kw: dict) -> float | None:
    """Predicted latency of `even_split` over all nodes in the given order; None if it does not fit."""
    if len(nodes) > cost.num_layers:
        return None
    from edgeshard.node.model.config import even_split

    counts = [s.end_layer - s.start_layer for s in even_split(cost.num_layers, len(nodes))]
    try:
        return evaluate(nodes, counts, cost, **kw).latency_ms
    except PlanError:
        return None


def _why_left_out(m: CostModel, node: PlanNode, order: list[PlanNode], counts: list[int]) -> str:
    one = m.memory(1, 2)
    if one > node.usable_bytes:
        return (
            f"cannot hold one layer ({format_bytes(one)} with its KV cache; it may use "
            f"{format_bytes(node.usable_bytes)})"
        )
    used = [n for n, c in zip(order, counts, strict=True) if c]
    fastest = min(used, key=lambda n: n.capability.layer_ms(m.cost, m.position))
    mine = node.capability.layer_ms(m.cost, m.position)
    return (
        f"would slow the pipeline: a layer takes {mine:.2f} ms here, {fastest.capability.layer_ms(m.cost, m.position):.2f}"
        f" ms on {fastest.name}, and another hop costs {m.hop_ms(node, False, False):.2f} ms"
    )


def _smallest_addition(nodes: Sequence[PlanNode], m: CostModel) -> int:
    """The least usable memory a node added to `nodes` needs for the model to fit (found by bisection over
    stage sizes: the answer is always the size of some stage, ends included)."""
    num_layers = m.cost.num_layers
    best = max(nodes, key=lambda n: n.capability.int4_gbps)

    def fits(memory: int) -> bool:
        extra = PlanNode(
            "+new", "+new", "", dataclasses.replace(best.capability, memory_limit=memory), 1 << 62
        )
        return _search(m, [*nodes, extra], "latency") is not None

    sizes = sorted(
        {m.memory(0, c) for c in range(1, num_layers + 1)}
        | {m.memory(num_layers - c, num_layers) for c in range(1, num_layers + 1)}
        | {m.memory(1, 1 + c) for c in range(1, num_layers - 1)}
    )
    lo, hi = 0, len(sizes) - 1
    if not fits(sizes[hi]):
        return m.memory(0, num_layers)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(sizes[mid]) else (mid + 1, hi)
    return sizes[lo]


def _no_fit(nodes: Sequence[PlanNode], m: CostModel) -> PlanError:
    cost = m.cost
    kv = cost.kv_bytes(cost.num_layers, m.context, m.sessions)
    need = cost.total_weight_bytes + kv
    have = sum(n.usable_bytes for n in nodes)
    add = _smallest_addition(nodes, m)
    what = (
        f"{cost.num_layers} layers in {cost.quant} need {format_bytes(need)} (weights "
        f"{format_bytes(cost.total_weight_bytes)} + KV cache {format_bytes(kv)} for {m.context} tokens x "
        f"{m.sessions} session(s)) and the {len(nodes)} node(s) may use {format_bytes(have)}"
    )
    if need > have:
        head = f"the cluster is {format_bytes(need - have)} short: {what}"
    else:
        head = (
            f"the layers do not split to fit: {what}, but each node holds whole layers, and the first and "
            "last stages also hold the embedding and the output head"
        )
    shrink = {"f32": 6.4, "bf16": 3.2, "int8": 1.6}.get(cost.quant)  # bytes per weight over int4's 0.625
    hints = [f"--quant int4 (weights about {shrink:.1f}x smaller)"] if shrink else []
    if kv > need // 10:
        hints.append("a shorter --context")
    return PlanError(
        f"{head}. Add a node with at least {format_bytes(add)} free memory"
        + "".join(f", or try {h}" for h in hints),
        missing_bytes=add,
    )
