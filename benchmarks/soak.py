"""Soak: many clients for minutes against a small local cluster while nodes die and come back.

Three loopback nodes serve the demo model (f32 by default: re-splitting layers is then bit-exact, see
docs/recovery.md) through the serving engine with recovery, as `edgeshard serve --peers` runs it. `--clients`
tasks send greedy completions (prompts from a fixed pool, `--max-tokens` tokens, end tokens ignored) back to
back for `--minutes`; every `--kill-every` seconds one node of the running plan is SIGKILLed and restarted at
its address a few seconds later (it comes back as a spare and replaces the next victim).

Checked, and written to benchmarks/results/soak.json:
- errors: every failed request by kind; 429 (cluster busy: the engine's queue is full) is intended, the
  client waits a moment and sends again; anything else is an error;
- answers: every completion against the same prompt's one-at-a-time answer (this process, every layer, the
  same format) computed before the soak;
- memory: RSS of the coordinator (this process) and of every node process, sampled every 10 s. The
  coordinator's growth from `--baseline-s` (minute 2) to the end. A node's memory changes legitimately when
  a recovery gives it other layers (a re-split: 15 layers instead of 10) or it loads after a restart, so a
  node's growth is given per span without such a change: from `--settle-s` after a recovery (or after
  `--baseline-s`) to the next recovery, for spans of at least `--min-span-s`; a leak shows in every span.
  The whole run's figures are in the JSON too (`rss_samples`, `recovered_at_s`).

    python benchmarks/soak.py                                # 10 minutes, 64 clients, a kill every 2 minutes
    python benchmarks/soak.py --minutes 3 --kill-every 60 --baseline-s 60   # a shorter run
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import signal
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

from edgeshard.coordinator.errors import ClusterBusyError
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.coordinator.serving.assemble import local_engine, peers_engine
from edgeshard.coordinator.serving.engine import GenerationRequest
from edgeshard.node.weights.registry import resolve_model
from edgeshard.node.weights.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
MODEL = "smollm2-135m"
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a village by the sea,",
    "The three laws of thermodynamics are",
    "A Raspberry Pi is a small computer that",
    "To bake bread you need flour, water,",
    "The quick brown fox",
    "In 1969 the first humans landed on",
    "Photosynthesis turns light into",
    "My favourite classroom experiment is",
    "import numpy as np\nx = np.arange(10)\n",
    "The difference between a list and a tuple in Python is",
    "Rain falls when",
    "Dear diary, today the cluster",
    "Water boils at 100 degrees Celsius at sea level because",
    "The best way to learn a language is",
]
SAMPLE_S = 10.0
BUSY_BACKOFF_S = 0.5


def _rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


async def reference(prompts: list[list[int]], quant: str, max_tokens: int) -> list[str]:
    """Each prompt's greedy answer, one at a time, every layer in this process."""
    served = await local_engine(MODEL, quant=quant, threads=1, max_running=1)
    try:
        return [
            (await served.engine.complete(_request(p, max_tokens))).text for p in prompts
        ]  # one at a time: each awaited before the next
    finally:
        await served.close()


def _request(prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def soak(args: argparse.Namespace, nodes: LocalNodes, prompts, want: list[str]) -> dict:
    served = await peers_engine(
        nodes.addresses,
        MODEL,
        quant=args.quant,
        candidates=nodes.addresses,
        max_running=args.max_running,
        max_queued=args.max_queued,
    )
    engine = served.engine
    pipe = engine.pipeline
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    counts: Counter = Counter()
    errors: Counter = Counter()
    latencies: list[float] = []
    wrong: list[dict] = []
    rss: dict[str, list[tuple[float, int]]] = {}  # process label -> [(t, rss)]
    recovered_at: list[float] = []  # when each recovery ended (seconds since the start)
    born: dict[str, float] = {}
    kills: list[dict] = []
    restarter = ThreadPoolExecutor(1, thread_name_prefix="restarter")  # its thread keeps restarted nodes
    loop = asyncio.get_running_loop()

    def label(i: int) -> str:
        return f"node{i + 1}/pid{nodes.procs[i].pid}"

    for i in range(len(nodes.procs)):
        born[label(i)] = 0.0

    async def client(k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < end:
            j = rng.randrange(len(prompts))
            t = time.perf_counter()
            try:
                out = await engine.complete(_request(prompts[j], args.max_tokens))
            except ClusterBusyError:
                counts["429"] += 1
                await asyncio.sleep(BUSY_BACKOFF_S)
                continue
            except Exception as e:  # noqa: BLE001 - every other failure is what the soak looks for
                errors[f"{type(e).__name__}: {str(e)[:160]}"] += 1
                await asyncio.sleep(BUSY_BACKOFF_S)
                continue
            latencies.append(time.perf_counter() - t)
            counts["ok"] += 1
            if out.text != want[j]:
                wrong.append({"prompt": j, "got": out.text, "want": want[j], "at_s": time.monotonic() - t0})

    async def sampler() -> None:
        while time.monotonic() < end + SAMPLE_S:
            now = time.monotonic() - t0
            while len(recovered_at) < len(pipe.recoveries):
                recovered_at.append(now)  # (within one sample period)
            rss.setdefault("coordinator", []).append((now, _rss(os.getpid()) or 0))
            for i, proc in enumerate(nodes.procs):
                if proc.poll() is None and (r := _rss(proc.pid)) is not None:
                    rss.setdefault(label(i), []).append((now, r))
            await asyncio.sleep(SAMPLE_S)

    async def chaos() -> None:
        rng = random.Random(7)
        while time.monotonic() + args.kill_every < end:
            await asyncio.sleep(args.kill_every)
            in_plan = [nodes.addresses.index(s["address"]) for s in pipe.deployment.plan]
            victim = rng.choice(in_plan)
            os.kill(nodes.procs[victim].pid, signal.SIGKILL)
            nodes.procs[victim].wait()
            at = time.monotonic() - t0
            await asyncio.sleep(args.down_s)  # the board reboots
            await loop.run_in_executor(restarter, nodes.restart, victim)
            born[label(victim)] = time.monotonic() - t0
            kills.append(
                {"node": victim + 1, "killed_at_s": round(at, 1), "back_at_s": round(born[label(victim)], 1)}
            )

    tasks = [asyncio.create_task(client(k)) for k in range(args.clients)]
    side = [asyncio.create_task(sampler()), asyncio.create_task(chaos())]
    try:
        await asyncio.gather(*tasks)
    finally:
        side[1].cancel()
        await asyncio.gather(side[1], return_exceptions=True)
        await side[0]
        recoveries = list(pipe.recoveries)
        await served.close()
        restarter.shutdown(wait=False)

    growth = rss_growth(rss, born, [k["killed_at_s"] for k in kills], recovered_at, args)
    return {
        "completions": counts["ok"],
        "busy_429": counts["429"],
        "errors": dict(errors),
        "wrong_answers": len(wrong),
        "wrong_examples": wrong[:5],
        "latency_s": {
            "median": round(statistics.median(latencies), 3) if latencies else None,
            "p95": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        },
        "kills": kills,
        "recoveries": [
            {
                k: r.get(k)
                for k in ("cause", "action", "outcome", "pause_ms", "resumed_ms", "sessions", "error")
            }
            for r in recoveries
        ],
        "rss_growth": growth,
        "recovered_at_s": [round(t, 1) for t in recovered_at],
        "born_s": {k: round(v, 1) for k, v in born.items()},
        "rss_samples": {k: [(round(t), round(r / 2**20, 1)) for t, r in v] for k, v in rss.items()},
    }


def rss_growth(
    rss: dict[str, list[tuple[float, int]]],
    born: dict[str, float],
    killed_at: list[float],
    recovered_at: list[float],
    args: argparse.Namespace,
) -> list[dict]:
    """RSS growth of the coordinator from `baseline_s` to the end, and of each node process over every span
    in which its shard cannot change: from `settle_s` after its start or after a recovery ended (not before
    `baseline_s`) to the next kill (a recovery's loads come after one)."""
    out = []
    for name, samples in rss.items():
        if name == "coordinator":
            cuts = [(args.baseline_s, float("inf"))]
        else:
            first = born.get(name, 0.0)
            starts = {max(args.baseline_s, t + args.settle_s) for t in [first, *recovered_at] if t >= first}
            cuts = [(a, min([k for k in killed_at if k > a] + [float("inf")])) for a in sorted(starts)]
        for a, b in cuts:
            span = [(t, r) for t, r in samples if a <= t < b]
            if len(span) < 2 or span[-1][0] - span[0][0] < args.min_span_s:
                continue  # too short to tell
            out.append(
                {
                    "process": name,
                    "from_s": round(span[0][0]),
                    "to_s": round(span[-1][0]),
                    "rss_from_mib": round(span[0][1] / 2**20, 1),
                    "rss_to_mib": round(span[-1][1] / 2**20, 1),
                    "growth_pct": round(100 * (span[-1][1] - span[0][1]) / span[0][1], 2),
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--kill-every", type=float, default=120.0, metavar="S", help="seconds between node kills")
    p.add_argument("--down-s", type=float, default=5.0, help="seconds a killed node stays down")
    p.add_argument("--baseline-s", type=float, default=120.0, help="RSS growth is measured from here")
    p.add_argument("--min-span-s", type=float, default=60.0, help="shortest span an RSS growth is given for")
    p.add_argument("--settle-s", type=float, default=20.0, help="after a recovery, RSS spans start this late")
    p.add_argument("--quant", default="f32", help="f32 (bit-exact re-splits) or int4")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--max-running", type=int, default=8, help="the engine's sequences in flight")
    p.add_argument("--max-queued", type=int, default=32, help="the engine's queue (beyond it: 429)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    path = resolve_model(MODEL)
    tokenizer = Tokenizer.from_checkpoint(path)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    t = time.perf_counter()
    want = asyncio.run(reference(prompts, args.quant, args.max_tokens))
    print(f"reference answers: {len(want)} prompts one at a time in {time.perf_counter() - t:.1f} s")
    gc.collect()
    with LocalNodes(3, model_dir=path.parent, name="soak", node_args=["--no-benchmark"]) as nodes:
        result = asyncio.run(soak(args, nodes, prompts, want))
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))

    print(f"\n{args.clients} clients, {args.minutes:g} min, {len(result['kills'])} kills, quant {args.quant}")
    print(f"{'completions':<24}{result['completions']}")
    print(f"{'429 (intended)':<24}{result['busy_429']}")
    print(f"{'errors':<24}{sum(result['errors'].values())}  {result['errors'] or ''}")
    print(f"{'wrong answers':<24}{result['wrong_answers']}")
    print(f"{'latency median / p95':<24}{result['latency_s']['median']} s / {result['latency_s']['p95']} s")
    for r in result["recoveries"]:
        print(
            f"recovery: {r['outcome']}, {r['action']}, pause {r['pause_ms']} ms, next result {r['resumed_ms']} ms"
        )
    print(f"\n{'process':<22}{'span':>12}{'RSS from':>12}{'RSS to':>10}{'growth':>9}")
    for g in result["rss_growth"]:
        print(
            f"{g['process']:<22}{g['from_s']:>5}-{g['to_s']:<4}s {g['rss_from_mib']:>9} MiB"
            f"{g['rss_to_mib']:>7} MiB{g['growth_pct']:>8}%"
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
