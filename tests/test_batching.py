"""Continuous batching on a node and admission at the coordinator, in-process on a tiny random model:
which queued messages share a forward, KV budgets, the stage loop, FIFO admission."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
import torch
from weights import TINY

from edgeshard.coordinator.pipeline.groups import StepGroups
from edgeshard.coordinator.serving.admission import Admission, kv_capacity
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.decoder import Stage
from edgeshard.node.model.executor import LocalPipeline, ShardExecutor, StepError, StepRequest
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.service.batching import Pending, StageTimes, group_size, take_batch
from edgeshard.node.service.ring import LAST, LoadedShard, RingNode
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import invalid

torch.set_num_threads(1)


def tiny_stage(seed: int = 0) -> Stage:
    """Every layer of a tiny random model, f32."""
    torch.manual_seed(seed)
    stage = Stage(TINY, ShardSpec(0, 2, 2))
    with torch.no_grad():
        for name, p in stage.named_parameters():
            p.copy_(
                torch.ones_like(p)
                if name.endswith("layernorm.weight") or name == "norm.weight"
                else p.normal_(0, 0.2)
            )
    return stage


# ------------------------------------------------------------------------------------------- take_batch


def _step(sid: str, rows: int = 1) -> Pending:
    msg = pb.ForwardMessage(session_id=sid)
    msg.tokens.ids.extend([1] * rows)
    return Pending(
        msg, lambda _r: None, "tokens", StepRequest(sid, 0, tokens=torch.ones(rows, dtype=torch.long))
    )


def _control(sid: str, kind: str) -> Pending:
    return Pending(pb.ForwardMessage(session_id=sid), lambda _r: None, kind)


def _names(items: list[Pending]) -> list[str]:
    return [f"{i.kind}:{i.msg.session_id}" for i in items]


def test_one_step_per_session_in_arrival_order():
    inbox = deque([_step("a"), _step("b"), _step("a"), _step("c"), _step("b")])
    controls, steps = take_batch(inbox, max_rows=256)
    assert controls == [] and _names(steps) == ["tokens:a", "tokens:b", "tokens:c"]
    assert _names(inbox) == ["tokens:a", "tokens:b"]  # the second steps wait for the next batch, in order


def test_controls_keep_their_session_order_and_their_own():
    # open c runs before the batch; end a follows a's step (next batch), and so must the open of d after it
    inbox = deque(
        [_control("c", "open"), _step("a"), _control("a", "end"), _control("d", "open"), _step("b")]
    )
    controls, steps = take_batch(inbox, max_rows=256)
    assert _names(controls) == ["open:c"] and _names(steps) == ["tokens:a", "tokens:b"]
    assert _names(inbox) == ["end:a", "open:d"]
    controls, steps = take_batch(inbox, max_rows=256)
    assert _names(controls) == ["end:a", "open:d"] and steps == []


def test_short_prompts_prefill_together_up_to_one_chunk():
    inbox = deque([_step("a", 20), _step("b", 30), _step("c"), _step("d", 100), _step("e", 70)])
    _, steps = take_batch(inbox, max_rows=256)
    assert _names(steps) == ["tokens:a", "tokens:b", "tokens:c", "tokens:e"]  # 120 prefill rows; d: 220
    _, steps = take_batch(inbox, max_rows=256)
    assert _names(steps) == ["tokens:d"]


def test_one_prefill_chunk_per_batch_and_the_row_cap():
    inbox = deque([_step("a", 100), _step("b"), _step("c", 50), _step("d"), _step("e", 300)])
    _, steps = take_batch(inbox, max_rows=256)
    assert _names(steps) == ["tokens:a", "tokens:b", "tokens:d"]  # c: a second chunk; e: over the cap
    _, steps = take_batch(inbox, max_rows=256)
    assert _names(steps) == ["tokens:c"]
    _, steps = take_batch(inbox, max_rows=256)
    assert _names(steps) == ["tokens:e"]  # alone it runs, whatever its size


def test_a_step_that_failed_to_decode_is_answered_in_order():
    bad = _step("a")
    bad.error = invalid("no")
    inbox = deque([_step("a"), bad, _step("b")])
    controls, steps = take_batch(inbox, max_rows=256)
    assert controls == [] and _names(steps) == ["tokens:a", "tokens:b"] and list(inbox) == [bad]


def test_group_size_splits_the_sessions_over_the_stages():
    assert group_size(8, 2) == 4 and group_size(7, 3) == 3 and group_size(1, 3) == 1
    assert group_size(8, 1) is None and group_size(8, 0) is None  # one stage or unknown: no cap
    inbox = deque([_step(s) for s in "abcdef"])
    _, steps = take_batch(inbox, max_rows=256, max_seqs=group_size(6, 2))
    assert _names(steps) == ["tokens:a", "tokens:b", "tokens:c"] and len(inbox) == 3


def test_stage_times_histogram():
    t = StageTimes()
    for n in (1, 2, 3, 8, 9, 100):
        t.record([_step(str(i)) for i in range(n)], t.started)
    stats = t.to_stats()
    assert stats["batch_hist"] == [1, 1, 1, 1, 1, 0, 0, 1] and stats["sequences"] == 123 == stats["rows"]


# ------------------------------------------------------------------------------------------- KV budget


def test_kv_budget_reserves_max_len_and_frees_on_close():
    ex = ShardExecutor(tiny_stage(), kv_budget=0)
    per = ex.kv_bytes_per_position  # 2 layers x k,v x 2 heads x 8 dims x 4 bytes
    assert per == 2 * 2 * 2 * 8 * 4
    ex.kv_budget = 250 * per
    ex.open_session("a", max_len=100)
    ex.open_session("b", max_len=100)
    with pytest.raises(OverflowError, match="KV memory is full"):
        ex.open_session("c", max_len=100)
    ex.open_session("c", max_len=50)
    assert ex.kv_reserved == 250 * per
    ex.close_session("a")
    ex.open_session("d", max_len=100)
    with pytest.raises(StepError, match="opened for"):  # a session cannot outgrow its reservation
        ex.validate(StepRequest("c", 0, tokens=torch.ones(51, dtype=torch.long)))
    for s in ("b", "c", "d"):
        ex.close_session(s)
    assert ex.kv_reserved == 0 and ex.kv_bytes() == 0


def test_kv_capacity_is_the_tightest_node():
    shards = [
        pb.ShardInfo(kv_budget=1000, kv_bytes_per_position=10),
        pb.ShardInfo(kv_budget=900, kv_bytes_per_position=3),
    ]
    assert kv_capacity(shards) == 100
    assert kv_capacity([pb.ShardInfo(kv_bytes_per_position=10)]) is None  # no budget anywhere: no limit


# ------------------------------------------------------------------------------------------- the stage loop


async def _ring_generate(
    node: RingNode, prompts: list[list[int]], tokens: int, batched: bool = False
) -> tuple[list[list[int]], list]:
    """Greedy generation of all prompts at once through a one-node ring, driven like RemotePipeline does.
    batched: the opens and prompts arrive as one message (ForwardMessage.batch), as a coordinator's writer
    sends what queued up while its last write was in flight."""
    results = node.subscribe("coord")
    replies: list = []
    out: list[list[int]] = [[] for _ in prompts]
    plan = node.shard.plan_id
    first: list[pb.ForwardMessage] = []
    for i, ids in enumerate(prompts):
        first.append(
            pb.ForwardMessage(
                plan_id=plan, session_id=f"s{i}", open=pb.OpenSession(reply_to="coord", max_len=64)
            )
        )
        msg = pb.ForwardMessage(plan_id=plan, session_id=f"s{i}", start=0, sample=True)
        msg.tokens.ids.extend(ids)
        first.append(msg)
    for msg in [pb.ForwardMessage(batch=first)] if batched else first:
        await node.handle(msg, replies.append)
    while sum(map(len, out)) < tokens * len(prompts):
        r = await asyncio.wait_for(results.get(), 30)
        if r.kind != pb.RESULT_TOKEN:
            continue
        i = int(r.session_id[1:])
        out[i].append(r.token)
        if len(out[i]) < tokens:
            msg = pb.ForwardMessage(
                plan_id=plan, session_id=r.session_id, start=len(prompts[i]) + len(out[i]) - 1, sample=True
            )
            msg.tokens.ids.append(r.token)
            await node.handle(msg, replies.append)
    for i in range(len(prompts)):
        await node.handle(
            pb.ForwardMessage(plan_id=plan, session_id=f"s{i}", end=pb.EndSession()), replies.append
        )
    return out, replies


@pytest.mark.parametrize("compute,batched", [("thread", False), ("inline", False), ("thread", True)])
def test_stage_loop_batches_and_matches_one_at_a_time(compute, batched):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [3, 2]]
    stage = tiny_stage()
    reference = []
    local = LocalPipeline([ShardExecutor(stage)])
    for i, ids in enumerate(prompts):
        local.open(f"r{i}", SamplingParams())
        toks = [local.step(f"r{i}", 0, ids)]
        while len(toks) < 12:
            toks.append(local.step(f"r{i}", len(ids) + len(toks) - 1, [toks[-1]]))
        reference.append(toks)

    async def run():
        node = RingNode("tiny", compute=compute)
        await node.install(
            LoadedShard(ShardExecutor(stage, kv_budget=1 << 20), "tiny", "f32", 7, LAST, 0, 0.0)
        )
        try:
            got, replies = await _ring_generate(node, prompts, 12, batched)
            for _ in range(100):  # the End messages are queued behind the last steps
                if not node.shard.executor.sessions:
                    break
                await asyncio.sleep(0.01)
            return got, replies, node.stats()
        finally:
            await node.unload()

    got, replies, stats = asyncio.run(run())
    assert replies == [] and got == reference
    if compute == "thread":  # inline reads messages only between forwards: this driver never queues any
        assert stats.sequences > stats.steps  # the four sequences shared forwards
    assert stats.sessions == 0 and stats.kv_bytes == 0 and stats.kv_reserved == 0
    assert sum(stats.batch_hist) == stats.steps and stats.wall_ms >= stats.compute_ms > 0


def test_malformed_batches_are_refused_and_the_rest_taken():
    async def run():
        node = RingNode("tiny")
        await node.install(LoadedShard(ShardExecutor(tiny_stage()), "tiny", "f32", 7, LAST, 0, 0.0))
        results, replies = node.subscribe("coord"), []
        try:
            nested = pb.ForwardMessage(session_id="n", batch=[pb.ForwardMessage(session_id="m")])
            opening = pb.ForwardMessage(plan_id=7, session_id="a", open=pb.OpenSession(reply_to="coord"))
            await node.handle(pb.ForwardMessage(batch=[nested, opening]), replies.append)
            both = pb.ForwardMessage(session_id="p", end=pb.EndSession(), batch=[opening])
            await node.handle(both, replies.append)
            return await asyncio.wait_for(results.get(), 10), replies, node.stats()
        finally:
            await node.unload()

    opened, replies, stats = asyncio.run(run())
    assert opened.kind == pb.RESULT_OPENED and opened.session_id == "a"
    assert [r.session_id for r in replies] == ["n", "p"] and "batch inside a batch" in replies[
        0
    ].error.message
    assert "no payload of its own" in replies[1].error.message
    assert stats.frames == 2 and stats.messages == 1  # only the first batch's open was taken


def test_coalesce_packs_runs_in_order_under_the_size_cap(monkeypatch):
    from edgeshard.node.service import next_hop

    def step(sid: str, floats: int) -> pb.ForwardMessage:
        msg = pb.ForwardMessage(session_id=sid)
        msg.hidden.data = bytes(4 * floats)
        return msg

    assert next_hop.coalesce([], pb.ForwardMessage, 1) == []
    lone = step("a", 8)
    assert next_hop.coalesce([lone], pb.ForwardMessage, 1) == [lone]  # a lone message goes as it is
    msgs = [step(s, 100) for s in "abcde"]
    (one,) = next_hop.coalesce(msgs, pb.ForwardMessage, 42)
    assert [m.session_id for m in one.batch] == list("abcde") and one.sent_at_us == 42
    monkeypatch.setattr(next_hop, "MAX_BATCH_BYTES", 2 * msgs[0].ByteSize())
    packed = next_hop.coalesce(msgs, pb.ForwardMessage, 42)
    assert [[m.session_id for m in p.batch] or [p.session_id] for p in packed] == [
        ["a", "b"],
        ["c", "d"],
        ["e"],
    ]
    results = [pb.Result(session_id=s, token=i) for i, s in enumerate("xy")]
    (both,) = next_hop.coalesce(results, pb.Result, 7)
    assert [(r.session_id, r.token) for r in both.batch] == [("x", 0), ("y", 1)]


def test_stage_loop_refuses_beyond_the_kv_budget():
    async def run():
        node = RingNode("tiny")
        ex = ShardExecutor(tiny_stage(), kv_budget=0)
        ex.kv_budget = 100 * ex.kv_bytes_per_position
        await node.install(LoadedShard(ex, "tiny", "f32", 7, LAST, 0, 0.0))
        results, replies = node.subscribe("coord"), []
        try:
            for sid in ("a", "b"):
                msg = pb.ForwardMessage(
                    plan_id=7, session_id=sid, open=pb.OpenSession(reply_to="coord", max_len=60)
                )
                await node.handle(msg, replies.append)
            first, second = await results.get(), await results.get()
            return first, second, replies
        finally:
            await node.unload()

    first, second, replies = asyncio.run(run())
    assert first.kind == pb.RESULT_OPENED and second.kind == pb.RESULT_ERROR
    assert "KV memory is full" in second.error.message and second.error.code == 8  # RESOURCE_EXHAUSTED
    assert len(replies) == 1 and replies[0].session_id == "b"


# ------------------------------------------------------------------------------------------- admission


def test_admission_is_first_come_first_served_within_kv_capacity():
    async def run():
        adm = Admission(max_running=3, kv_capacity=100)
        a, b = adm.enter(60), adm.enter(30)  # running
        c = adm.enter(50)  # needs 50: queued
        d = adm.enter(5)  # fits, but c waits ahead of it
        assert (a.state, b.state, c.state, d.state) == ("running", "running", "queued", "queued")
        assert adm.waiting == 2 and not adm.can_start(1)
        adm.leave(a)  # 30 reserved: c (50) and d (5) start
        assert c.granted.done() and d.granted.done() and adm.reserved == 85 and adm.running == 3
        e = adm.enter(10)
        waiter = asyncio.ensure_future(e.granted)
        await asyncio.sleep(0)
        waiter.cancel()  # a client that leaves while queued gives its place back
        await asyncio.sleep(0)
        adm.leave(e)
        assert adm.waiting == 0
        for t in (b, c, d):
            adm.leave(t)
        assert adm.running == 0 and adm.reserved == 0
        adm.max_running = 1
        f, g = adm.enter(1), adm.enter(1)
        assert g.state == "queued"
        adm.max_running = 2  # raising the limit admits at once
        assert g.state == "running" and f.state == "running"

    asyncio.run(run())


# ------------------------------------------------------------------------------------------- step groups


def test_step_groups_send_each_group_as_one_burst():
    async def run():
        sent: list[tuple[str, int]] = []
        groups = StepGroups(2, lambda m: sent.append((m.session_id, m.burst_left)), linger_s=0.05)

        def step(sid: str) -> None:
            groups.submit(sid, pb.ForwardMessage(session_id=sid))

        step("a")  # alone in group 0: at once
        step("b")  # group 1: at once
        step("c")  # group 0, where a is in flight: waits for a
        assert sent == [("a", 0), ("b", 0)] and groups.sizes() == [2, 1]
        groups.returned("a")  # a is back; c waits for a's next step (a moment)
        assert len(sent) == 2
        step("a")
        assert sent[2:] == [("c", 1), ("a", 0)]  # one burst: node 1 waits for the second message
        groups.returned("c")
        groups.returned("a")
        step("c")
        await asyncio.sleep(0.1)  # a never sends again (nor closes): c goes alone, a leaves the group
        assert sent[4:] == [("c", 0)] and groups.sizes() == [1, 1]
        groups.returned("b")
        groups.leave("b")
        assert groups.sizes() == [1, 0]

    asyncio.run(run())
