"""Many sequences through a real cluster at once (node processes, gRPC ring, HTTP API): the nodes batch their
steps, and every sequence gets exactly what it gets alone; cancelled sequences free their caches on every
node; a full KV budget answers 429 (slow: starts processes)."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import torch

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.pipeline.stage_client import connect
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.coordinator.serving.assemble import peers_engine
from edgeshard.coordinator.serving.http_server import BackgroundServer
from edgeshard.node.model.sampling import SamplingParams

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

QUANT = "f32"  # f32 splits are bit-identical to one process (tests/test_pipeline.py); batching keeps tokens
TOKENS = 24
TOPICS = ["the sea", "a robot", "the moon", "a forest", "a storm", "a cat", "a train", "a violin"]
PROMPTS = [[1, 504, 3458, 282, 4649, 314, 8411 + 17 * i, 30] + [260 + i] * (i % 3) for i in range(8)]


async def _tokens(pipe, ids: list[int], n: int = TOKENS, chunk: int = 128) -> list[int]:
    return [t async for t in generate(pipe, Sequence(ids, SamplingParams(), n), prefill_chunk=chunk)]


async def _node_stats(addresses: list[str]):
    clients, infos = await connect(addresses)
    await asyncio.gather(*(c.close() for c in clients))
    return [i.stats for i in infos]


async def _wait_freed(addresses: list[str], timeout: float = 20.0):
    """Until no node holds a session or KV memory; the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await _node_stats(addresses)
        if all(s.sessions == 0 and s.kv_bytes == 0 and s.kv_reserved == 0 for s in stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"nodes still hold sessions: {[(s.sessions, s.kv_bytes) for s in stats]}")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def ring(node_cluster, smollm2_path):
    """The 3 test nodes loaded with f32 shards and the tokens of each prompt generated alone."""

    async def load():
        d = await deploy(node_cluster.addresses, smollm2_path.name, 30, QUANT)
        pipe = await d.pipeline()
        try:
            return d.plan_id, [await _tokens(pipe, ids) for ids in PROMPTS]
        finally:
            await pipe.aclose()
            await d.close()

    return asyncio.run(load())


def test_eight_concurrent_sequences_match_one_at_a_time_and_are_batched(node_cluster, smollm2_path, ring):
    _, alone = ring

    async def run():
        d = await deploy(node_cluster.addresses, smollm2_path.name, 30, QUANT)
        pipe = await d.pipeline()
        try:
            before = await _node_stats(node_cluster.addresses)
            together = await asyncio.gather(*(_tokens(pipe, ids) for ids in PROMPTS))
            after = await _wait_freed(node_cluster.addresses)
            return together, after, [a.fed - b.fed for a, b in zip(after, before, strict=True)]
        finally:
            await pipe.aclose()
            await d.close()

    together, stats, fed = asyncio.run(run())
    assert together == alone
    for s in stats:  # counters start at the load: this run only
        assert s.sequences / s.steps > 1.5, f"batches of {s.sequences / s.steps:.2f} sequences on average"
        assert sum(s.batch_hist) == s.steps and s.wall_ms > s.compute_ms > 0
        # a group's steps travel as one gRPC message per hop (ForwardMessage.batch), not one per sequence
        # (1.0 without; ~1.5 here, where the opens, prompts and ends of 8 short requests go one by one)
        assert s.messages / s.frames > 1.3, f"{s.messages} messages came in {s.frames} gRPC messages"
    # every session was fed (the last node sent its tokens straight to node 1), not just a lone one
    assert sum(fed) >= len(PROMPTS) * (TOKENS - 2), fed


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(node_cluster, smollm2_path, ring):
    _, alone = ring
    long_prompt = (PROMPTS[0] * 80)[:600]

    async def run():
        d = await deploy(node_cluster.addresses, smollm2_path.name, 30, QUANT)
        pipe = await d.pipeline()
        try:
            reference = await _tokens(pipe, long_prompt, 8)  # alone
            made: list[float] = []  # when the short sequences made their tokens

            async def short(ids: list[int]) -> list[int]:
                out = []
                async for t in generate(pipe, Sequence(ids, SamplingParams(), TOKENS)):
                    out.append(t)
                    made.append(time.perf_counter())
                return out

            shorts = [asyncio.create_task(short(ids)) for ids in PROMPTS[:4]]
            while len(made) < 4:  # they decode already
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            seq = Sequence(long_prompt, SamplingParams(), 8)
            long_tokens = [t async for t in generate(pipe, seq, prefill_chunk=128)]
            first_long = started + seq.ttft_s
            during = sum(started < t < first_long for t in made)
            return reference, long_tokens, await asyncio.gather(*shorts), during
        finally:
            await pipe.aclose()
            await d.close()

    reference, long_tokens, shorts, during = asyncio.run(run())
    assert long_tokens == reference and shorts == alone[:4]
    assert during >= 4, f"only {during} tokens of the other sequences while 600 prompt tokens were prefilled"


@pytest.fixture(scope="module")
def api(node_cluster, smollm2_path):
    """The HTTP API over the 3 test nodes (f32), as `serve --peers` builds it."""
    server = BackgroundServer(
        lambda: peers_engine(
            node_cluster.addresses, "smollm2-135m", QUANT, node_model=smollm2_path.name, max_running=16
        )
    )
    server.start()
    yield server
    server.stop()


def _ask(client, topic: str, **kw):
    return client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": f"Write one sentence about {topic}."}],
        max_tokens=TOKENS,
        temperature=0,
        **kw,
    )


def test_http_concurrent_requests_match_one_at_a_time(api):
    async def main():
        async with openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0) as client:
            alone = [(await _ask(client, t)).choices[0].message.content for t in TOPICS]
            together = await asyncio.gather(*(_ask(client, t) for t in TOPICS))
            return alone, [r.choices[0].message.content for r in together]

    alone, together = asyncio.run(main())
    assert together == alone and len(set(alone)) == len(TOPICS)
    info = openai.OpenAI(base_url=api.url + "/v1", api_key="x").get("/cluster", cast_to=object)
    assert all(n["sequences_per_step"] > 1 for n in info["nodes"]), info["nodes"]
    assert all(0 < n["utilization"] < 1 and len(n["batch_hist"]) == 8 for n in info["nodes"])
    assert all(n["messages_per_frame"] > 1 for n in info["nodes"]), info["nodes"]  # batched hops


def test_http_stream_disconnect_frees_the_sequence_on_every_node(api, node_cluster):
    engine = api.served.engine
    client = openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stats = asyncio.run(_node_stats(node_cluster.addresses))
    assert all(s.sessions == 1 and s.kv_bytes > 0 for s in stats)  # it is generating on every node
    stream.close()
    asyncio.run(_wait_freed(node_cluster.addresses))  # 400 tokens: only the cancel frees it this fast
    assert engine.running == 0 and engine.admission.reserved == 0


def test_full_kv_budget_is_429_and_admitted_requests_are_right(smollm2_path):
    prompt = [1, 504, 3458, 282, 4649, 314, 8411, 30]  # 8 tokens + 16 generated: 24 positions a request
    # 15 f32 layers of SmolLM2 on each node, K and V, plus the boundary row (576 f32) the first node keeps
    # for recovery (docs/recovery.md); the first node binds, the last keeps no rows
    per_position = 15 * 2 * 3 * 64 * 4 + 576 * 4
    budget = 60 * per_position  # two requests fit (48 positions), a third waits
    with LocalNodes(2, model_dir=smollm2_path.parent, name="kv", node_args=["--kv-budget", str(budget)]) as c:
        server = BackgroundServer(
            lambda: peers_engine(
                c.addresses, "smollm2-135m", QUANT, node_model=smollm2_path.name, max_running=8, max_queued=1
            )
        )
        server.start()
        try:
            assert server.served.engine.admission.kv_capacity == 60

            async def main():
                async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as oai:

                    async def one(p):
                        return await oai.completions.create(
                            model="smollm2-135m",
                            prompt=p,
                            max_tokens=16,
                            temperature=0,
                            extra_body={"ignore_eos": True},
                        )

                    prompts = [prompt[:-1] + [30 + i] for i in range(5)]
                    results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
                    alone = [(await one(p)).choices[0].text for p in prompts]
                    return results, alone

            results, alone = asyncio.run(main())
            busy = [r for r in results if isinstance(r, openai.RateLimitError)]
            ok = [(i, r) for i, r in enumerate(results) if not isinstance(r, BaseException)]
            assert len(ok) == 3 and len(busy) == 2, results  # 2 running + 1 queued; the rest 429
            assert all("busy" in e.message and e.code == "cluster_busy" for e in busy)
            assert all(r.choices[0].text == alone[i] and r.usage.completion_tokens == 16 for i, r in ok)
            stats = asyncio.run(_wait_freed(c.addresses))
            assert all(s.kv_reserved == 0 for s in stats)
        finally:
            server.stop()
