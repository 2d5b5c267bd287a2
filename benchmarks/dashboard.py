"""Does a classroom watching the dashboard slow the cluster? Generation speed with W open pages polling.

    python benchmarks/dashboard.py                 # 0 and 30 watchers, 3 runs each, 64 tokens
    python benchmarks/dashboard.py --watchers 0,10,30,60 --runs 5
    python benchmarks/dashboard.py --quick         # 0 and 30 watchers, 1 run, 16 tokens

A LocalCluster of 2 node processes (one torch thread each) serves smollm2-135m. Each watcher is what an open
page does: GET /v1/cluster?max_age=0.5 once a second (threads with their own HTTP connection, started at random phases).
Per watcher count, median over `--runs` (counts interleaved, so other load on the machine hits them alike):

* tok/s of one request generating `--tokens` tokens (greedy, ignore_eos), end to end through the HTTP API;
* the /v1/cluster latency the watchers saw (median and p90); the watchers run in a process of their own;
* CPU per generated token of the coordinator process (HTTP, the polls) and of the node processes;
* node reads per second: how often the server actually asked the nodes (GetInfo on each), against the polls
  per second it answered; concurrent polls share one read (serving/metrics.py ClusterView).

Writes benchmarks/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import statistics
import threading
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from edgeshard.coordinator.sdk.local_cluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results" / "dashboard.json"


def _watch(url: str, n: int, stop, out) -> None:
    """`n` threads polling /v1/cluster once a second (in a process of their own: the server's process keeps
    its GIL to itself, as when the pages are other machines' browsers); their latencies go to `out`."""
    os.nice(19)  # the pages stand for other machines' browsers: their own CPU use should not count here
    latencies: list[float] = []

    def poll() -> None:
        time.sleep(random.random())  # pages were opened at different moments
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                client.get(url + "/v1/cluster?max_age=0.5").raise_for_status()  # as the page polls
                latencies.append(time.perf_counter() - t0)
                stop.wait(1.0)

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(latencies)


class Watchers:
    """`n` open pages polling /v1/cluster once a second, in another process; `latencies()` when done."""

    def __init__(self, url: str, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.n, self.stop, self.out = n, ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=_watch, args=(url, n, self.stop, self.out), daemon=True)
        self.latencies: list[float] = []

    def __enter__(self) -> Watchers:
        if self.n:
            self.proc.start()
            time.sleep(3.0)  # the process started and every watcher polling before the measurement
        return self

    def __exit__(self, *exc) -> None:
        if self.n:
            self.stop.set()
            self.latencies = self.out.get(timeout=60)
            self.proc.join(10)


def one_run(cluster: LocalCluster, watchers: int, tokens: int, reads: list[float]) -> dict:
    procs = [psutil.Process(), *(psutil.Process(p.pid) for p in cluster.processes.procs)]
    with Watchers(cluster.url, watchers) as w:
        cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
        t0 = time.perf_counter()
        r = httpx.post(
            cluster.url + "/v1/completions",
            json={"prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": True, "temperature": 0},
            timeout=600,
        )
        t1 = time.perf_counter()
        cpu = [sum(p.cpu_times()[:2]) - c for p, c in zip(procs, cpu0, strict=True)]
    wall = t1 - t0
    node_reads = sum(t0 <= t <= t1 for t in reads)
    lat = sorted(w.latencies)
    made = r.json()["usage"]["completion_tokens"]
    return {
        "tok_s": made / wall,
        "poll_ms_median": 1000 * statistics.median(lat) if lat else None,
        "poll_ms_p90": 1000 * lat[int(0.9 * (len(lat) - 1))] if lat else None,
        "polls_per_s": len(lat) / (wall + 3.0) if lat else 0.0,  # the watchers polled from 3 s before
        "node_reads_per_s": node_reads / wall,
        # CPU seconds per generated token: the coordinator (this process: HTTP, the polls) and the nodes
        "coordinator_cpu_ms_per_token": 1000 * cpu[0] / made,
        "nodes_cpu_ms_per_token": 1000 * sum(cpu[1:]) / made,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--watchers", default="0,30", help="comma-separated numbers of open pages")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="1 run of 16 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.tokens = 1, 16
    counts = [int(x) for x in args.watchers.split(",")]
    console = Console()
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    with LocalCluster(model="smollm2-135m", nodes=2, threads=1) as cluster:
        reads: list[float] = []  # one entry per read of the nodes (the plan's GetInfo fan-out)
        engine = cluster.engine
        info = engine.info

        async def counted() -> dict:
            reads.append(time.perf_counter())
            return await info()

        engine.info = counted
        httpx.post(cluster.url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=120)
        for _ in range(args.runs):
            for w in counts:
                runs[w].append(one_run(cluster, w, args.tokens, reads))
                console.print(f"{w} watchers: {runs[w][-1]['tok_s']:.1f} tok/s", style="dim")

    def med(w: int, key: str):
        vals = [r[key] for r in runs[w] if r[key] is not None]
        return statistics.median(vals) if vals else None

    summary = {w: {k: med(w, k) for k in runs[w][0]} for w in counts}
    base = summary[counts[0]]["tok_s"]
    table = Table(title=f"generation with open dashboards ({args.tokens} tokens, median of {args.runs})")
    cols = ("watchers", "tok/s", f"vs {counts[0]}", "poll ms (med / p90)", "polls/s", "node reads/s")
    for col in (*cols, "coord. CPU ms/tok", "nodes CPU ms/tok"):
        table.add_column(col, justify="right")
    for w in counts:
        s = summary[w]
        table.add_row(
            str(w),
            f"{s['tok_s']:.1f}",
            f"{s['tok_s'] / base:.2f}x",
            "–" if s["poll_ms_median"] is None else f"{s['poll_ms_median']:.1f} / {s['poll_ms_p90']:.1f}",
            f"{s['polls_per_s']:.1f}",
            f"{s['node_reads_per_s']:.1f}",
            f"{s['coordinator_cpu_ms_per_token']:.1f}",
            f"{s['nodes_cpu_ms_per_token']:.1f}",
        )
    console.print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                "tokens": args.tokens,
                "runs": args.runs,
                "summary": summary,
                "runs_raw": runs,
            },
            indent=1,
        )
    )
    console.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
