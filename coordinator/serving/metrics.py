"""Prometheus metrics of a server (`GET /metrics`, the Prometheus text format, made with prometheus_client).

Two kinds of figures:

- What the engine sees, recorded as it happens (`ServingMetrics`, one per Engine, each with its own
  `CollectorRegistry` so several servers can live in one process, as in the tests): requests, refusals by HTTP
  status (429 = busy), prompt and completion tokens, time to first token and the time between tokens.
- What the nodes report, read when scraped (`ClusterCollector`): the `/v1/cluster` snapshot turned into
  per-node counters and gauges: compute, network and idle seconds, steps, KV bytes, up/down, and recoveries.
  Scrapes and the dashboard share one `ClusterView`, so thirty browsers and a Prometheus cost one GetInfo per
  node at a time, not thirty.

The names, for a Grafana board (`node` and `address` label the per-node ones):

    edgeshard_requests_total                          admitted requests
    edgeshard_requests_refused_total{status}          refused before running (429 busy, 400, 404, 503)
    edgeshard_prompt_tokens_total                     prompt tokens of admitted requests
    edgeshard_completion_tokens_total                 tokens generated
    edgeshard_time_to_first_token_seconds             histogram: submit (queueing included) to first token
    edgeshard_time_per_output_token_seconds           histogram: between one token and the next of a request
    edgeshard_requests_running / _queued              gauges, now
    edgeshard_kv_capacity_positions / _reserved       admission's KV positions (0: no limit)
    edgeshard_node_up                                 1 answering (and not marked down by recovery), else 0
    edgeshard_node_steps_total                        forward passes of the node's stage
    edgeshard_node_compute_seconds_total              time in the stage's forward
    edgeshard_node_network_seconds_total              time steps spent on the wire into the node
    edgeshard_node_idle_seconds_total                 time with nothing queued and nothing running
    edgeshard_node_wall_seconds_total                 time since the shard was loaded
    edgeshard_node_errors_total                       messages refused or failed
    edgeshard_node_sessions                           sessions open now
    edgeshard_node_kv_bytes / _kv_reserved_bytes / _kv_budget_bytes
    edgeshard_node_layers                             layers the node holds
    edgeshard_recoveries_total{outcome}               recoveries from node failures, by outcome
    edgeshard_serving                                 1 while a plan runs, else 0
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# A token takes ~10 ms on a laptop and ~1 s on a Pi 4 cluster of a large model; first tokens include prefill
# and queueing, so their buckets reach minutes.
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServingMetrics:
    """The engine's counters and histograms, in a registry of their own (one per engine)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("edgeshard_requests", "Requests admitted", registry=r)
        self.refused = Counter(
            "edgeshard_requests_refused",
            "Requests refused before running, by HTTP status (429: the cluster is busy)",
            ["status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "edgeshard_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.completion_tokens = Counter("edgeshard_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "edgeshard_time_to_first_token_seconds",
            "Seconds from a request's arrival (queueing included) to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "edgeshard_time_per_output_token_seconds",
            "Seconds between one generated token and the next of the same request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )

    def token(self, request: TokenClock) -> None:
        """One token of `request` came out now."""
        now = time.monotonic()
        self.completion_tokens.inc()
        if request.last is None:
            self.ttft.observe(now - request.arrived)
        else:
            self.tpot.observe(now - request.last)
        request.last = now


class TokenClock:
    """When a request arrived and when its last token came out (for the latency histograms)."""

    __slots__ = ("arrived", "last")

    def __init__(self) -> None:
        self.arrived = time.monotonic()
        self.last: float | None = None


class ClusterView:
    """`engine.cluster_info()` shared by readers: while one read is in flight, others await it, and a reader
    that accepts a snapshot `max_age` seconds old gets the last one when it is that fresh.

    A read asks every node (GetInfo) and costs the coordinator ~10 ms of CPU; thirty open pages polling once
    a second with `max_age=0.5` cost at most two reads a second (benchmarks/dashboard.py).
    """

    def __init__(self, read: Callable[[], Awaitable[dict]]) -> None:
        self.read = read
        self._inflight: asyncio.Future | None = None
        self._last: tuple[float, dict] | None = None  # (monotonic time the read finished, its result)

    async def get(self, max_age: float = 0.0) -> dict:
        """The cluster now (or as the read already under way finds it, or as of at most `max_age` s ago)."""
        if max_age > 0 and self._last is not None and time.monotonic() - self._last[0] <= max_age:
            return self._last[1]
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self.read())
            self._inflight.add_done_callback(self._done)
        return await asyncio.shield(self._inflight)

    def _done(self, fut: asyncio.Future) -> None:
        self._inflight = None
        if (
            not fut.cancelled() and fut.exception() is None
        ):  # exception() marks it retrieved: readers raise it
            self._last = (time.monotonic(), fut.result())


class ClusterCollector:
    """Per-node and engine gauges from a `/v1/cluster` snapshot (set `snapshot` before collecting)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the cluster

    def collect(self) -> Iterator[Metric]:
        info = self.snapshot
        eng = info.get("engine", {})
        for name, key, doc in (
            ("edgeshard_requests_running", "running", "Requests generating now"),
            ("edgeshard_requests_queued", "queued", "Requests admitted and waiting for a slot or KV memory"),
            (
                "edgeshard_kv_capacity_positions",
                "kv_capacity",
                "KV positions the cluster holds (0: no limit)",
            ),
            ("edgeshard_kv_reserved_positions", "kv_reserved", "KV positions running requests reserve"),
        ):
            yield GaugeMetricFamily(name, doc, value=eng.get(key, 0))
        recovery = info.get("recovery") or {}
        yield GaugeMetricFamily(
            "edgeshard_serving",
            "1 while a plan runs, else 0",
            value=1 if info.get("nodes") and recovery.get("state", "serving") == "serving" else 0,
        )
        outcomes = CounterMetricFamily(
            "edgeshard_recoveries", "Recoveries from node failures, by outcome", labels=["outcome"]
        )
        counts: dict[str, int] = {"recovered": 0}
        for event in recovery.get("recoveries", []):
            counts[event.get("outcome", "unknown")] = counts.get(event.get("outcome", "unknown"), 0) + 1
        for outcome, n in sorted(counts.items()):
            outcomes.add_metric([outcome], n)
        yield outcomes
        yield from self._nodes(info.get("nodes", []), recovery.get("nodes", {}))

    def _nodes(self, nodes: list[dict], liveness: dict[str, dict]) -> Iterator[Metric]:
        labels = ["node", "address"]

        def family(kind, name, doc):
            return (CounterMetricFamily if kind == "c" else GaugeMetricFamily)(name, doc, labels=labels)

        fams = {
            "up": family(
                "g", "edgeshard_node_up", "1 when the node answers and recovery has not marked it down"
            ),
            "steps": family("c", "edgeshard_node_steps", "Forward passes the node's stage ran"),
            "compute_ms": family("c", "edgeshard_node_compute_seconds", "Seconds in the stage's forward"),
            "network_ms": family("c", "edgeshard_node_network_seconds", "Seconds steps spent on the wire in"),
            "idle_ms": family("c", "edgeshard_node_idle_seconds", "Seconds with nothing queued or running"),
            "wall_ms": family("c", "edgeshard_node_wall_seconds", "Seconds since the shard was loaded"),
            "errors": family("c", "edgeshard_node_errors", "Messages the node refused or failed"),
            "sessions": family("g", "edgeshard_node_sessions", "Sessions open on the node now"),
            "kv_bytes": family("g", "edgeshard_node_kv_bytes", "Bytes the node's KV caches hold now"),
            "kv_reserved": family("g", "edgeshard_node_kv_reserved_bytes", "KV bytes open sessions reserve"),
            "kv_budget": family(
                "g", "edgeshard_node_kv_budget_bytes", "KV bytes the node allows (0: no limit)"
            ),
            "layers": family("g", "edgeshard_node_layers", "Decoder layers the node holds"),
        }
        for i, n in enumerate(nodes):
            address = n.get("address") or ""
            key = [str(n.get("node", f"stage{i}")), address]
            state = liveness.get(address, {}).get("state", "up")
            fams["up"].add_metric(key, 1 if n.get("status", "ok") == "ok" and state == "up" else 0)
            fams["layers"].add_metric(key, n.get("end_layer", 0) - n.get("start_layer", 0))
            for field, fam in fams.items():
                if field in ("up", "layers") or field not in n:
                    continue
                value = n[field]
                fam.add_metric(key, value / 1000 if field.endswith("_ms") else value)
        yield from fams.values()


class _Forward:
    """A collector yielding another registry's metrics (the engine's, inside an app's registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.source = registry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return self.source.collect()


class MetricsEndpoint:
    """What `GET /metrics` answers for one app: its own registry, holding the engine's metrics and the
    cluster's snapshot (read through `view`)."""

    def __init__(self, metrics: ServingMetrics, view: ClusterView) -> None:
        self.view = view
        self.collector = ClusterCollector()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Forward(metrics.registry))
        self.registry.register(self.collector)

    async def render(self) -> bytes:
        """The exposition text (Prometheus format 0.0.4)."""
        info = await self.view.get()
        self.collector.snapshot = info  # no await from here on: one snapshot per exposition
        return generate_latest(self.registry)
