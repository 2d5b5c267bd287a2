"""The pure parts of failure recovery, without processes: what a replay feeds, where the layers go after a
failure, which node errors rebuild the ring, and what the capacity error says. (End to end, with real node
processes being killed: tests/test_recovery.py.)"""

from __future__ import annotations

import grpc
import pytest

from edgeshard.coordinator.discovery.members import Member
from edgeshard.coordinator.errors import CapacityError, ClusterError, ServerUnavailableError
from edgeshard.coordinator.pipeline.remote import RemoteStepError
from edgeshard.coordinator.recovery.log import RecoveryEvent, RecoveryPolicy, SessionHistory
from edgeshard.coordinator.recovery.replan import Replanner
from edgeshard.coordinator.recovery.watchdog import about_the_request
from edgeshard.node.model.cost import ModelCost
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.presence.capability import Capability
from edgeshard.node.wire import edgeshard_pb2 as pb

MIB = 1 << 20


def test_a_replay_repeats_the_calls_before_the_one_in_flight():
    h = SessionHistory("s", SamplingParams())
    h.feed(0, list(range(128)))  # prefill chunks
    h.feed(128, list(range(128, 200)))
    h.pending = None
    for pos in range(200, 203):  # decode steps, one token each
        h.feed(pos, [pos])
        h.pending = None
    h.feed(203, [203])  # in flight when the node died: retried, not replayed
    calls = h.replay_calls()
    assert [(s, len(t)) for s, t in calls] == [(0, 128), (128, 72), (200, 1), (201, 1), (202, 1)]
    assert h.replay_tokens() == list(range(203))
    h.feed(201, [7])  # a step may restart an earlier position: what came after it is forgotten
    assert [s for s, _ in h.replay_calls()] == [0, 128, 200] and h.tokens[-1] == 7
    with pytest.raises(ValueError, match="gap"):
        h.feed(500, [1])


def test_deadline_grows_with_the_rows_fed():
    policy = RecoveryPolicy(step_deadline_s=2.0, row_s=0.01)
    assert policy.deadline(0) == 2.0 and policy.deadline(500) == pytest.approx(7.0)


@pytest.fixture(scope="module")
def cost(smollm2_path):
    from edgeshard.node.weights.checkpoint import open_checkpoint

    return ModelCost.of(open_checkpoint(smollm2_path).config, "int4")


def member(i: int, limit_mib: int = 75) -> Member:
    cap = Capability(memory_total=8 << 30, memory_free=4 << 30, memory_limit=limit_mib * MIB)
    return Member(f"192.0.2.{i}:1", f"n{i}", f"192.0.2.{i}:1", "peers", "ok", capability=cap)


def running(*nodes: int) -> list[dict]:
    ranges = [(0, 10), (10, 20), (20, 30)]
    return [
        {"node": f"n{i}", "address": f"192.0.2.{i}:1", "start_layer": a, "end_layer": b}
        for i, (a, b) in zip(nodes, ranges)
    ]


def test_a_lost_stage_goes_to_an_idle_node_with_its_layers(cost):
    r = Replanner([], cost, model="m")
    placed = r.choose(running(1, 2, 3), [member(1), member(3), member(4)])
    assert placed.action == "replaced n2 by n4"
    assert [(s.node, s.start_layer, s.end_layer) for s in placed.plan.stages] == [
        ("n1", 0, 10),
        ("n4", 10, 20),
        ("n3", 20, 30),
    ]


def test_without_a_spare_the_survivors_re_split_or_the_planner_places(cost):
    survivors = [member(1, 4096), member(3, 4096)]
    even = Replanner([], cost, model="m").choose(running(1, 2, 3), survivors)
    assert even.action == "re-split the layers evenly over 2 node(s)"
    assert [(s.start_layer, s.end_layer) for s in even.plan.stages] == [(0, 15), (15, 30)]
    planned = Replanner([], cost, model="m", even=False).choose(running(1, 2, 3), survivors)
    assert planned.action == "re-split the layers over all 2 live node(s)"
    assert [s.node for s in planned.plan.stages] == ["n1", "n3"]  # both survivors work (not all on one)
    assert planned.plan.stages[0].start_layer == 0 and planned.plan.stages[-1].end_layer == 30


def test_a_re_split_uses_every_survivor_within_its_memory(cost):
    """A planned ring (--layers, --discover) that loses a node re-splits over ALL the survivors: before, the
    planner put all 30 layers on one of two survivors. A small survivor gets fewer layers, not none."""
    from edgeshard.coordinator.placement.cost_model import POSITION, CostModel, evaluate, with_fallback_speeds
    from edgeshard.coordinator.placement.gather import plan_node
    from edgeshard.coordinator.recovery.replan import _LINK, split_over_all

    four = [  # a ring of four stages loses n2: three survivors, no spare
        {"node": f"n{i}", "address": f"192.0.2.{i}:1", "start_layer": a, "end_layer": b}
        for i, (a, b) in zip((1, 2, 3, 4), [(0, 8), (8, 16), (16, 24), (24, 30)])
    ]
    survivors = [member(1, 60), member(3, 4096), member(4, 4096)]
    for even in (True, False):  # an even split (10 layers each) does not fit n1's 60 MiB either
        placed = Replanner([], cost, model="m", even=even).choose(four, survivors)
        assert placed.action == "re-split the layers over all 3 live node(s)"
        stages = placed.plan.stages
        assert [s.node for s in stages] == ["n1", "n3", "n4"] and all(
            s.end_layer > s.start_layer for s in stages
        )
        assert 0 < stages[0].end_layer - stages[0].start_layer < 10  # fewer layers on the small node
        assert all(s.weight_bytes + s.kv_bytes <= s.usable_bytes for s in stages)
    # the split is the cost model's best among those using every node: no other fitting split is faster
    nodes = with_fallback_speeds([plan_node(m, _LINK) for m in survivors])  # as `choose` sees them
    m = CostModel(cost, placed.plan.context, placed.plan.sessions, POSITION)
    counts = split_over_all(nodes, m)
    best = evaluate(nodes, counts, cost, context=placed.plan.context).latency_ms
    for a in range(1, 29):
        for b in range(1, 30 - a):
            try:
                other = evaluate(nodes, [a, b, 30 - a - b], cost, context=placed.plan.context)
            except Exception:
                continue  # does not fit
            assert best <= other.latency_ms + 1e-9
    assert split_over_all(nodes[:1] * 31, m) is None  # more nodes than layers


def test_a_node_back_at_its_address_takes_its_stage_again(cost):
    placed = Replanner([], cost).choose(running(1, 2, 3), [member(1), member(2), member(3)])
    assert placed.action == "reloaded the same plan"


def test_when_the_nodes_left_cannot_hold_the_model_the_error_says_what_to_add(cost):
    with pytest.raises(CapacityError) as e:
        Replanner([], cost, model="smollm2").choose(running(1, 2, 3), [member(1), member(3)])
    msg = str(e.value)
    assert "n2 (192.0.2.2:1) is gone" in msg and "n1 (192.0.2.1:1), n3 (192.0.2.3:1)" in msg
    assert "short" in msg and "Add a node with at least" in msg and e.value.missing_bytes > 0
    assert isinstance(e.value, ClusterError) and isinstance(e.value, ServerUnavailableError)
    assert e.value.status == 503 and e.value.code == "insufficient_memory"
    with pytest.raises(CapacityError, match="no node is left"):
        Replanner([], cost).choose(running(1, 2, 3), [])


def step_error(code: grpc.StatusCode, message: str) -> RemoteStepError:
    return RemoteStepError(pb.Error(code=code.value[0], message=message, node="n1"))


def test_only_node_failures_rebuild_the_ring():
    assert about_the_request(step_error(grpc.StatusCode.INVALID_ARGUMENT, "token ids must be in [0, 10)"))
    assert about_the_request(step_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV memory is full"))
    assert not about_the_request(step_error(grpc.StatusCode.UNAVAILABLE, "the next node is unreachable"))
    assert not about_the_request(step_error(grpc.StatusCode.FAILED_PRECONDITION, "has no shard loaded"))
    assert not about_the_request(step_error(grpc.StatusCode.INVALID_ARGUMENT, "stale plan id 3: serves 4"))
    assert not about_the_request(ClusterError("node 192.0.2.1:1 closed the Results stream"))


def test_the_log_line_says_what_failed_and_how_long_each_part_took():
    e = RecoveryEvent(0.0, "n2 down: connection refused", ["n2 (192.0.2.2:1)"], probe_ms=9)
    e.replan_ms, e.load_ms, e.replay_ms, e.pause_ms = 30, 1800, 500, 2400
    e.sessions, e.replayed_tokens, e.action, e.outcome, e.plan_id = (
        1,
        300,
        "replaced n2 by n4",
        "recovered",
        7,
    )
    e.plan = running(1, 4, 3)
    line = e.summary()
    assert line.startswith("n2 (192.0.2.2:1) failed (n2 down: connection refused); recovered in 2.4 s")
    assert "load 1800 ms" in line and "replay 1 sequence (300 tokens) 500 ms" in line and "n4 10-19" in line
    assert set(e.to_dict()) >= {"detected_at", "cause", "nodes", "replan_ms", "load_ms", "pause_ms"}


def test_a_node_that_comes_back_is_balanced_in_only_when_predicted_faster(cost):
    """After a re-split over n1 and n3, n2 returns. For throughput the bottleneck drops from 15 layers to 10:
    balance it in. For latency the cost model charges the extra hop and the compute is the same: stay."""
    resplit = [
        {"node": "n1", "address": "192.0.2.1:1", "start_layer": 0, "end_layer": 15},
        {"node": "n3", "address": "192.0.2.3:1", "start_layer": 15, "end_layer": 30},
    ]
    live = [member(1, 4096), member(3, 4096), member(2, 4096)]
    fast = Replanner([], cost, model="m", objective="throughput").better(resplit, live)
    assert fast is not None and fast.action.startswith("balanced in 1 node(s): predicted")
    assert [(s.node, s.start_layer, s.end_layer) for s in fast.plan.stages] == [
        ("n1", 0, 10),
        ("n3", 10, 20),
        ("n2", 20, 30),
    ]
    assert Replanner([], cost, model="m", objective="latency").better(resplit, live) is None
    assert Replanner([], cost, objective="throughput").better(resplit, live[:2]) is None  # nobody new
    assert Replanner([], cost, objective="throughput").better(resplit, live[1:]) is None  # n1 is down
