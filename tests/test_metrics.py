"""GET /metrics: the Prometheus text format, parsed by prometheus_client's own parser, counting what the
server did (tokens against the usage the API reported, refusals by status), and guarded by the API key."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edgeshard.coordinator.serving.http_security import HttpSecurity, build_app


def scrape(url: str, **kw) -> dict[str, dict[tuple, float]]:
    """name -> {labels as sorted tuple: value} of every sample of one scrape."""
    r = httpx.get(url + "/metrics", timeout=30, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_token_counters_grow_by_the_request(api_server):
    before = scrape(api_server.url)
    r = httpx.post(
        api_server.url + "/v1/completions",
        json={"prompt": "The sky is", "max_tokens": 7, "temperature": 0},
        timeout=120,
    )
    usage = r.json()["usage"]
    after = scrape(api_server.url)
    grew = {
        name: value(after, name) - value(before, name)
        for name in (
            "edgeshard_completion_tokens_total",
            "edgeshard_prompt_tokens_total",
            "edgeshard_requests_total",
            "edgeshard_time_to_first_token_seconds_count",
            "edgeshard_time_per_output_token_seconds_count",
        )
    }
    assert usage["completion_tokens"] >= 1
    assert grew == {
        "edgeshard_completion_tokens_total": usage["completion_tokens"],
        "edgeshard_prompt_tokens_total": usage["prompt_tokens"],
        "edgeshard_requests_total": 1,
        "edgeshard_time_to_first_token_seconds_count": 1,  # one first token
        "edgeshard_time_per_output_token_seconds_count": usage["completion_tokens"] - 1,  # the gaps after it
    }
    # the local pipeline's one stage: the layers it holds, and it is up
    assert value(after, "edgeshard_node_layers", node="local", address="") == 30
    assert value(after, "edgeshard_node_up", node="local", address="") == 1
    assert value(after, "edgeshard_serving") == 1


def test_refusals_by_status(api_server):
    before = scrape(api_server.url)
    r = httpx.post(api_server.url + "/v1/completions", json={"prompt": "x", "model": "gpt-4"}, timeout=30)
    assert r.status_code == 404
    r = httpx.post(api_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 10**6}, timeout=30)
    assert r.status_code == 400
    after = scrape(api_server.url)
    name = "edgeshard_requests_refused_total"
    assert value(after, name, status="404") - value(before, name, status="404") == 1
    assert value(after, name, status="400") - value(before, name, status="400") == 1


def test_metrics_wants_the_api_key(api_server):
    """With a key set, /metrics answers 401 without it (as /v1 does), and the figures with it."""
    app = build_app(api_server.served.engine, HttpSecurity(api_key="sesame"))
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://127.0.0.1") as client:  # a Host this server answers to
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and "edgeshard_completion_tokens_total" in ok.text


def test_cluster_view_shares_one_read_between_concurrent_readers():
    """Thirty pages polling at once cost one read of the nodes; the next poll reads afresh unless it accepts
    an older snapshot; errors reach every reader."""
    import asyncio

    from edgeshard.coordinator.serving.metrics import ClusterView

    reads = 0

    async def read():
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)
        if reads == 3:
            raise RuntimeError("node went away")
        return {"read": reads}

    async def main():
        view = ClusterView(read)
        first = await asyncio.gather(*(view.get() for _ in range(30)))
        second = await view.get()
        fresh_enough = await view.get(max_age=60)  # the last read is that fresh: no new read
        third = await asyncio.gather(*(view.get() for _ in range(3)), return_exceptions=True)
        after_error = await view.get(max_age=60)  # the failed read left the last good one in place
        return first, second, fresh_enough, third, after_error

    first, second, fresh_enough, third, after_error = asyncio.run(main())
    assert first == [{"read": 1}] * 30 and second == fresh_enough == after_error == {"read": 2}
    assert reads == 3 and all(isinstance(e, RuntimeError) for e in third)
