"""The planner: property tests on random heterogeneous clusters, a brute-force oracle, and the error paths."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard.coordinator.errors import PlanError
from edgeshard.coordinator.placement.links import Link
from edgeshard.coordinator.placement.plan import Plan
from edgeshard.coordinator.placement.planner import PlanNode, evaluate, make_plan
from edgeshard.node.model.config import ModelConfig
from edgeshard.node.model.cost import QUANTS, ModelCost
from edgeshard.node.presence.capability import Capability

GIB = 1 << 30


def _config(layers: int, hidden: int = 128, vocab: int = 1000) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=4096,
    )


def _node(
    i: int,
    gbps: float,
    overhead: float,
    limit: int,
    rtt: float = 0.5,
    mbps: float = 100.0,
    step: float = 0.05,
) -> PlanNode:
    cap = Capability(
        cores=4,
        threads=1,
        memory_total=8 * GIB,
        memory_free=6 * GIB,
        memory_limit=limit,
        mem_gbps=gbps * 2,
        int4_gbps=gbps,
        int8_gbps=gbps,
        bf16_gbps=gbps,
        f32_gbps=gbps,
        layer_overhead_ms=overhead,
        step_overhead_ms=step,
    )
    return PlanNode(f"n{i}", f"n{i}", f"127.0.0.1:{5000 + i}", cap, 6 * GIB, Link(rtt, mbps))


@st.composite
def clusters(draw, max_nodes: int = 6, max_layers: int = 40):
    layers = draw(st.integers(2, max_layers))
    cost = ModelCost.of(
        _config(layers, hidden=draw(st.sampled_from([64, 128, 256]))), draw(st.sampled_from(QUANTS))
    )
    context = draw(st.integers(16, 1024))
    total = cost.total_weight_bytes + cost.kv_bytes(layers, context)
    n = draw(st.integers(1, max_nodes))
    nodes = [
        _node(
            i,
            gbps=draw(st.floats(0.3, 20)),
            overhead=draw(st.floats(0.01, 2)),
            limit=int(total * draw(st.floats(0.05, 1.3))),
            rtt=draw(st.floats(0.05, 5)),
            mbps=draw(st.floats(1, 1000)),
            step=draw(st.floats(0, 0.5)),
        )
        for i in range(n)
    ]
    return nodes, cost, context


def _check_valid(plan: Plan, nodes: list[PlanNode], cost: ModelCost) -> None:
    by_key = {n.key: n for n in nodes}
    assert plan.stages[0].start_layer == 0 and plan.stages[-1].end_layer == cost.num_layers
    for a, b in itertools.pairwise(plan.stages):
        assert a.end_layer == b.start_layer  # contiguous: every layer exactly once, in order
    assert all(s.end_layer > s.start_layer for s in plan.stages)
    assert len({s.key for s in plan.stages}) == len(plan.stages)  # a node runs one range
    for s in plan.stages:
        assert s.weight_bytes == cost.weight_bytes(s.start_layer, s.end_layer)
        assert s.weight_bytes + s.kv_bytes <= by_key[s.key].usable_bytes  # nobody over memory
    assert len(plan.stages) + len(plan.left_out) == len(nodes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_random_clusters_fit_and_beat_the_even_split(case):
    nodes, cost, context = case
    try:
        plan = make_plan(nodes, cost, context=context)
    except PlanError as e:
        assert e.missing_bytes > 0 and "Add a node with at least" in str(e)
        # the error says what to add, and adding exactly that makes the model fit
        extra = dataclasses.replace(
            nodes[0],
            key="new",
            name="new",
            capability=dataclasses.replace(nodes[0].capability, memory_limit=e.missing_bytes),
        )
        _check_valid(make_plan([*nodes, extra], cost, context=context), [*nodes, extra], cost)
        return
    _check_valid(plan, nodes, cost)
    if plan.even_split_ms is not None:
        assert plan.latency_ms <= plan.even_split_ms + 1e-6
    assert plan.bottleneck_ms == max(s.stage_ms for s in plan.stages)


def _brute_force(nodes: list[PlanNode], cost: ModelCost, context: int) -> float | None:
    """The best latency over every ordered subset of nodes and every split of the layers (tiny cases only)."""
    best = None
    for k in range(1, len(nodes) + 1):
        for order in itertools.permutations(nodes, k):
            for cuts in itertools.combinations(range(1, cost.num_layers), k - 1):
                bounds = (0, *cuts, cost.num_layers)
                counts = [b - a for a, b in itertools.pairwise(bounds)]
                try:
                    ms = evaluate(list(order), counts, cost, context=context).latency_ms
                except PlanError:
                    continue
                best = ms if best is None else min(best, ms)
    return best


@settings(max_examples=60, deadline=None)
@given(clusters(max_nodes=4, max_layers=8))
def test_the_search_is_exact_on_small_clusters(case):
    nodes, cost, context = case
    oracle = _brute_force(nodes, cost, context)
    if oracle is None:
        with pytest.raises(PlanError):
            make_plan(nodes, cost, context=context)
    else:
        assert make_plan(nodes, cost, context=context).latency_ms == pytest.approx(oracle, abs=1e-6)


def test_the_slowest_board_gets_the_fewest_layers():
    cost = ModelCost.of(_config(30), "int4")
    per_node = (cost.total_weight_bytes + cost.kv_bytes(30, 256)) // 2  # memory forces all three in
    nodes = [_node(0, 1.0, 0.5, per_node), _node(1, 8.0, 0.1, per_node), _node(2, 4.0, 0.2, per_node)]
    plan = make_plan(nodes, cost, context=256)
    layers = {s.node: s.layers for s in plan.stages}
    assert layers["n0"] < layers["n2"] < layers["n1"]
    assert plan.latency_ms < plan.even_split_ms


def test_a_node_that_only_adds_a_hop_is_left_out_and_the_reason_given():
    cost = ModelCost.of(_config(12), "int4")
    nodes = [_node(0, 8.0, 0.1, 4 * GIB), _node(1, 0.5, 2.0, 4 * GIB)]
    plan = make_plan(nodes, cost)
    assert [s.node for s in plan.stages] == ["n0"]
    assert plan.left_out[0][0] == "n1" and "slow the pipeline" in plan.left_out[0][1]


def test_impossible_cluster_says_how_much_memory_is_missing():
    cost = ModelCost.of(_config(20, hidden=256), "bf16")
    need = cost.total_weight_bytes + cost.kv_bytes(20, 512)
    nodes = [_node(0, 4.0, 0.1, need // 4), _node(1, 4.0, 0.1, need // 4)]
    with pytest.raises(PlanError, match="short") as err:
        make_plan(nodes, cost, context=512)
    assert err.value.missing_bytes >= need // 2
    assert "--quant int4" in str(err.value)


def test_layers_override_and_its_errors():
    cost = ModelCost.of(_config(30), "int4")
    nodes = [_node(i, 4.0, 0.1, 4 * GIB) for i in range(3)]
    plan = make_plan(nodes, cost, layers=[10, 0, 20])
    assert [(s.node, s.start_layer, s.end_layer) for s in plan.stages] == [("n0", 0, 10), ("n2", 10, 30)]
    with pytest.raises(PlanError, match="add up"):
        make_plan(nodes, cost, layers=[10, 10, 5])
    with pytest.raises(PlanError, match="one per node"):
        make_plan(nodes, cost, layers=[15, 15])
    small = [_node(0, 4.0, 0.1, cost.weight_bytes(0, 3)), *nodes[1:]]
    with pytest.raises(PlanError, match="n0 needs"):
        make_plan(small, cost, layers=[10, 10, 10])


def test_throughput_objective_balances_stages():
    cost = ModelCost.of(_config(24), "int4")
    nodes = [_node(i, 4.0, 0.1, 4 * GIB) for i in range(3)]
    latency = make_plan(nodes, cost)
    throughput = make_plan(nodes, cost, objective="throughput")
    assert len(latency.stages) == 1  # one sequence: hops only cost
    assert len(throughput.stages) == 3 and throughput.bottleneck_ms < latency.bottleneck_ms


def test_plan_is_a_value():
    cost = ModelCost.of(_config(10), "int8")
    nodes = [_node(0, 2.0, 0.1, cost.total_weight_bytes // 2 + (64 << 20)), _node(1, 3.0, 0.1, 4 * GIB)]
    plan = make_plan(nodes, cost, model="m.gguf")
    assert Plan.from_msgpack(plan.to_msgpack()) == plan
    assert Plan.from_dict(plan.to_dict()) == plan and hash(plan) == hash(Plan.from_dict(plan.to_dict()))
    assert "predicted" in str(plan) and plan.specs()[0].start_layer == 0
    keys = {"node", "address", "start_layer", "end_layer", "quant", "weight_bytes"}  # as run --json (CLI.md)
    assert plan.run_entries()[0].keys() == keys


def test_unmeasured_nodes_get_the_median_speed():
    cost = ModelCost.of(_config(10), "int4")
    bare = dataclasses.replace(_node(1, 1.0, 0.1, 4 * GIB), capability=Capability(memory_total=8 * GIB))
    plan = make_plan([_node(0, 4.0, 0.1, cost.weight_bytes(0, 5)), bare], cost, context=64)
    assert all(s.compute_ms > 0 for s in plan.stages)
