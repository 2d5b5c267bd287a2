"""Resuming a session after a failure at the cost of the lost stage only (node side, in-process, tiny random
f32 model): the boundary rows a stage keeps, a replacement filled from them call by call (its cache and its
next outputs bit-identical to the uninterrupted stage's), a survivor keeping its cache across a new plan id,
sessions of a closed node stream waiting for a recovery, and the refusals that make the coordinator replay.
The end-to-end runs over real node processes are in tests/test_recovery_resume_cluster.py."""

from __future__ import annotations

import asyncio

import pytest
import torch
from weights import TINY

from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.decoder import Stage
from edgeshard.node.model.executor import SessionError, ShardExecutor, StepError, StepRequest
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.service.recover import recover
from edgeshard.node.service.ring import LAST, LoadedShard, RingNode
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import WireError, tensor_to_wire

torch.set_num_threads(1)
CALLS = [(0, 7), (7, 5), (12, 1), (13, 1), (14, 1)]  # two prefill chunks, then decode steps
TOKENS = [(i * 7 + 3) % 64 for i in range(15)]


def stage(spec: ShardSpec, seed: int) -> Stage:
    torch.manual_seed(seed)
    s = Stage(TINY, spec)
    with torch.no_grad():
        for name, p in s.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else p.normal_(0, 0.2))
    return s


@pytest.fixture
def stages():
    return stage(ShardSpec(0, 1, 2), 1), stage(ShardSpec(1, 2, 2), 2)


def run(first: ShardExecutor, last: ShardExecutor, calls=CALLS) -> list[int]:
    """Feed the calls through both stages as a ring would; the sampled tokens."""
    out = []
    for start, n in calls:
        (h,) = first.step([StepRequest("s", start, tokens=torch.tensor(TOKENS[start : start + n]))])
        (r,) = last.step([StepRequest("s", start, hidden=h.hidden)])
        out.append(r.token)
    return out


def opened(st: Stage) -> ShardExecutor:
    ex = ShardExecutor(st)
    ex.open_session("s", SamplingParams())
    return ex


def cache_of(ex: ShardExecutor) -> torch.Tensor:
    c = ex.sessions["s"].cache
    return c.buffer[:, :, :, : c.offset].clone()


def test_a_stage_keeps_the_rows_it_sent_and_counts_them(stages):
    first, last = opened(stages[0]), opened(stages[1])
    sent = []
    for start, n in CALLS:
        (h,) = first.step([StepRequest("s", start, tokens=torch.tensor(TOKENS[start : start + n]))])
        sent.append(h.hidden.clone())
        last.step([StepRequest("s", start, hidden=h.hidden)])
    assert torch.equal(first.sent_rows("s", 15), torch.cat(sent))  # exactly what went on, by position
    assert first.kept_bytes_per_position == 32 * 4 and last.kept_bytes_per_position == 0
    assert first.sessions["s"].reserved == 512 * (first.kv_bytes_per_position + 32 * 4)  # in the budget
    assert first.kept_bytes() == first.sessions["s"].sent.nbytes > 0 and last.kept_bytes() == 0
    info = LoadedShard(first, "tiny", "f32", 1, "next:1", 0, 0.0).info()  # what GetInfo reports
    assert info.kept_bytes_per_position == 128 and info.kv_bytes_per_position == first.bytes_per_position
    assert first.kv_bytes() == first.sessions["s"].cache.nbytes() + first.kept_bytes()
    with pytest.raises(StepError, match="16 boundary rows needed"):
        first.sent_rows("s", 16)
    # a step restarting an earlier position (a retry) overwrites the tail: the rows are what was last sent
    (h,) = first.step([StepRequest("s", 13, tokens=torch.tensor([5]))])
    assert first.sessions["s"].kept == 14 and torch.equal(first.sent_rows("s", 14)[13], h.hidden[0])


def test_a_replacement_filled_call_by_call_equals_the_uninterrupted_stage(stages):
    first, last = opened(stages[0]), opened(stages[1])
    reference = run(first, last, CALLS + [(15 - 1, 1)])  # and one more step after position 14
    first, last = opened(stages[0]), opened(stages[1])
    assert run(first, last) == reference[:-1]
    # the last stage dies; a replacement (same layers, fresh) is filled from the rows the first one kept
    rows = first.sent_rows("s", 15)
    spare = opened(stages[1])
    calls = [StepRequest("s", a, hidden=rows[a : a + n]) for a, n in CALLS]
    assert spare.fill("s", calls) == 15 and spare.recovered_rows == 15
    assert torch.equal(cache_of(spare), cache_of(last))  # bit for bit
    # and the first stage died instead: refilled from the tokens, its kept rows are those it sent before
    first2 = opened(stages[0])
    first2.fill("s", [StepRequest("s", a, tokens=torch.tensor(TOKENS[a : a + n])) for a, n in CALLS])
    assert torch.equal(cache_of(first2), cache_of(first)) and torch.equal(first2.sent_rows("s", 15), rows)
    assert run(first2, spare, [(14, 1)]) == reference[-1:]  # the ring resumes with the same token


def test_keep_checks_what_a_survivor_holds_and_drops_the_call_in_flight(stages):
    first, last = opened(stages[0]), opened(stages[1])
    run(first, last)
    kept = first.keep("s", 13)  # positions 13-14 were the call in flight: the coordinator retries it
    assert kept.cache.offset == 13 and kept.kept == 13
    with pytest.raises(StepError, match="14 positions needed"):
        first.keep("s", 14)
    with pytest.raises(SessionError):
        first.keep("other", 1)
    # a new executor of the same stage (a new plan id) adopts the sessions with their reservations
    successor = ShardExecutor(stages[0])
    successor.adopt(first)
    assert "s" in successor.sessions and not first.sessions and successor.kv_reserved > 0
    assert successor.keep("s", 13).cache.offset == 13


def aiter_of(*msgs):
    async def gen():
        for m in msgs:
            yield m

    return gen()


def test_recover_keep_and_fill_on_a_node(stages):
    async def go():
        node = RingNode("n1", compute="inline")
        ex = opened(stages[1])
        await node.install(LoadedShard(ex, "tiny", "f32", 5, LAST, 0, 0.0))
        first = opened(stages[0])
        run(first, ex)
        head = pb.RecoverMessage(plan_id=5, session_id="s", action=pb.RECOVER_KEEP, positions=15)
        head.open.reply_to = "coord-2"
        reply = await recover(node, aiter_of(head))
        assert reply.held == 15 and node.route["s"] == "coord-2" and "s" not in node.orphans
        with pytest.raises(WireError, match="16 positions needed"):
            await recover(
                node, aiter_of(pb.RecoverMessage(plan_id=5, session_id="s", action=1, positions=16))
            )
        with pytest.raises(WireError, match="stale plan id"):
            await recover(node, aiter_of(pb.RecoverMessage(plan_id=4, session_id="s", action=1)))
        # FILL: one message per call, as FEED_NEXT sends them
        rows = first.sent_rows("s", 15)
        msgs = []
        for i, (a, n) in enumerate(CALLS):
            m = pb.RecoverMessage(start=a)
            if i == 0:
                m = pb.RecoverMessage(
                    plan_id=5, session_id="t", action=pb.RECOVER_FILL, positions=15, start=0
                )
            tensor_to_wire(rows[a : a + n], m.hidden)
            msgs.append(m)
        reply = await recover(node, aiter_of(*msgs))
        assert (reply.held, reply.rows) == (15, 15) and node.stats().recovered_rows == 15
        assert torch.equal(
            ex.sessions["t"].cache.buffer[:, :, :, :15], ex.sessions["s"].cache.buffer[:, :, :, :15]
        )
        bad = pb.RecoverMessage(plan_id=5, session_id="u", action=pb.RECOVER_FILL, positions=3, start=1)
        tensor_to_wire(rows[:2], bad.hidden)
        with pytest.raises(WireError, match="in order"):
            await recover(node, aiter_of(bad))
        assert "u" not in ex.sessions  # refused before anything was opened
        big = pb.RecoverMessage(plan_id=5, session_id="u", action=pb.RECOVER_FILL, positions=1, start=0)
        tensor_to_wire(rows[:2], big.hidden)
        with pytest.raises(WireError, match="more rows than"):
            await recover(node, aiter_of(big))
        await node.unload()

    asyncio.run(go())


def test_sessions_of_a_closed_node_stream_wait_for_a_recovery(stages):
    async def go():
        node = RingNode("n1", compute="inline")
        node.orphan_s = 0.2
        ex = opened(stages[1])
        ex.open_session("gone", SamplingParams())
        await node.install(LoadedShard(ex, "tiny", "f32", 5, LAST, 0, 0.0))
        node.orphans.clear()  # installed fresh (as if opened by messages): not orphans
        upstream = []
        node.upstream.update({"s": upstream.append, "gone": upstream.append})
        assert node.stream_closed(upstream.append, from_node=True) == 2
        assert set(node.orphans) == {"s", "gone"} and len(ex.sessions) == 2  # kept, for now
        node.adopted("s")  # a recovery resumed this one
        await asyncio.sleep(0.5)  # the other is ended after orphan_s
        assert set(ex.sessions) == {"s"} and node.reaped == 1
        # a coordinator's stream closing ends its sessions at once, as before
        node.upstream["s"] = upstream.append
        assert node.stream_closed(upstream.append) == 1
        await asyncio.sleep(0.05)
        assert not ex.sessions
        await node.unload()

    asyncio.run(go())
