"""Recovery benchmark: how long a generation pauses when a node is SIGKILLed, against a shard's load time.

Three loopback nodes run the demo model (layers 0-9, 10-19, 20-29) and a fourth waits as the spare. Each trial
generates `--tokens` greedy tokens and kills the node of a random stage after a random decode step; the ring
replaces it with the spare (which loads the lost layer range), replays the sequence and goes on. The killed
node is restarted at its address and becomes the next spare. `--mode resplit` has no spare: the two survivors
re-split the layers (both load), and the three-node ring is deployed again before every trial.

    python benchmarks/recovery.py                  # 5 trials, spare, the checkpoint's own format (int4)
    python benchmarks/recovery.py --mode resplit --quant f32 --trials 3
    python benchmarks/recovery.py --prompt-tokens 1500 --hot-spare --trials 3   # a long context
    python benchmarks/recovery.py --prompt-tokens 1500 --hot-spare --trials 6 --compare-replay --tokens 16

`--hot-spare` loads the lost stage's layers on the spare before the kill (a spare already holding the
weights): the recovery then loads nothing and kill to next token is detection + resume (or replay).

A recovery resumes the sequence from the caches the survivors kept (coordinator/recovery/resume.py): only the
lost stage's layers are computed again, over the positions before the failed call, fed by the node before it.
`--compare-replay` alternates trials with `RecoveryPolicy.resume` off (the full replay of the whole history
through every stage, what recovery did before), on the same ring in the same run, for the ratio.

Reported per trial: kill -> next token (what the user waits, measured where the tokens arrive), and the parts
of the recovery (coordinator/recovery/log.py): detect (probing), re-plan, load, replay, pause (first sign ->
serving again). For scale: the cold load of one 10-layer shard when the ring was first deployed, and one
normal decode step. Every interrupted output is compared with an uninterrupted run. Writes
benchmarks/results/recovery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.recovery.resilient import resilient
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.config import even_split
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.registry import resolve_model

RESULTS = Path(__file__).resolve().parent / "results" / "recovery.json"
PROMPT = list(range(1000, 1100))  # 100 token ids: a prefill of one chunk and a bit (--prompt-tokens)


async def preload_spare(pipe, cluster: LocalNodes, stage: int) -> None:
    """Load `stage`'s layers on a live node outside the plan (Deployment.preload_spare), so the recovery finds
    a spare already holding them."""
    used = {s["address"] for s in pipe.deployment.plan}
    spare = next(a for a, p in zip(cluster.addresses, cluster.procs) if a not in used and p.poll() is None)
    await pipe.deployment.preload_spare(spare, stage)


async def run_trial(pipe, cluster: LocalNodes, tokens: int, stage: int, after: int) -> dict:
    """One generation that loses the node of `stage` after `after` tokens; timings of the recovery."""
    victim = cluster.addresses.index(pipe.deployment.plan[stage]["address"])
    out, times, killed = [], [], [0.0]
    async for token in generate(pipe, Sequence(PROMPT, SamplingParams(), tokens)):
        out.append(token)
        times.append(time.perf_counter())
        if len(out) == after:  # generate() waits at its yield: the next step meets the dead node
            cluster.procs[victim].kill()
            cluster.procs[victim].wait()
            killed[0] = time.perf_counter()
    event = pipe.events[-1]
    steps = [b - a for a, b in zip(times, times[1:])]
    return {
        "stage": stage,
        "killed_after_token": after,
        "node": pipe.deployment.plan[stage]["node"],
        "kill_to_next_token_ms": (times[after] - killed[0]) * 1e3,
        "normal_step_ms": statistics.median(steps[: after - 1] + steps[after:]) * 1e3,  # not the pause
        **{k: event.to_dict()[k] for k in ("probe_ms", "replan_ms", "load_ms", "replay_ms", "pause_ms")},
        "replayed_tokens": event.replayed_tokens,
        "how": "resume" if event.resumed else "replay",
        "refilled_rows": event.refilled_rows,
        "refill_compute_ms": round(event.refill_compute_ms, 1),
        "kept_stages": event.kept_stages,
        "action": event.action,
        "tokens": out,
    }


async def main_async(args: argparse.Namespace, path: Path, cluster: LocalNodes) -> dict:
    rng = random.Random(args.seed)
    spare = args.mode == "spare"
    specs = even_split(30, 3)
    trials, cold = [], []
    pipe = deployment = None
    try:
        for i in range(args.trials):
            if pipe is None or not spare:  # resplit: the three-node ring again (spare: it goes on)
                if pipe is not None:
                    await pipe.aclose()
                    await deployment.close()
                addresses = [a for a, p in zip(cluster.addresses, cluster.procs) if p.poll() is None][:3]
                deployment = await deploy(addresses, path.name, 30, args.quant, specs=specs)
                cold.extend(deployment.load_s if i == 0 else [])
                candidates = cluster.addresses if spare else addresses
                pipe = resilient(deployment, await deployment.pipeline(), path, candidates=candidates)
            if i == 0:  # the uninterrupted reference (and a warm-up)
                reference = [t async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), args.tokens))]
            stage, after = rng.randrange(3), rng.randrange(2, args.tokens - 2)
            if args.hot_spare:
                await preload_spare(pipe, cluster, stage)
            # --compare-replay: every other trial with the full replay (interleaved: the same load on both)
            pipe.policy = dataclasses.replace(pipe.policy, resume=not (args.compare_replay and i % 2))
            trial = await run_trial(pipe, cluster, args.tokens, stage, after)
            trial["same_output"] = trial.pop("tokens") == reference
            trials.append(trial)
            print(
                f"trial {i + 1}: stage {stage} killed after token {after}: next token "
                f"{trial['kill_to_next_token_ms']:.0f} ms later ({trial['action']}, {trial['how']})",
                flush=True,
            )
            for j, proc in enumerate(cluster.procs):  # the victim comes back, empty: the next spare
                if proc.poll() is not None:
                    cluster.restart(j)
    finally:
        if pipe is not None:
            await pipe.aclose()
            await deployment.close()
    return {"trials": trials, "cold_load_s": cold}


def _table(trials: list[dict]):
    from rich.table import Table

    t = Table(
        "trial",
        "stage",
        "after",
        "kill->token ms",
        "detect ms",
        "re-plan ms",
        "load ms",
        "replay ms",
        "pause ms",
        "how",
        "rows again",
        "fill compute ms",
        "step ms",
        "same",
        title="recovery: one sequence, greedy; a node SIGKILLed mid-generation",
    )
    for i, r in enumerate(trials, 1):
        t.add_row(
            str(i),
            str(r["stage"]),
            str(r["killed_after_token"]),
            f"{r['kill_to_next_token_ms']:.0f}",
            f"{r['probe_ms']:.0f}",
            f"{r['replan_ms']:.0f}",
            f"{r['load_ms']:.0f}",
            f"{r['replay_ms']:.0f}",
            f"{r['pause_ms']:.0f}",
            r["how"],
            str(r["refilled_rows"] if r["how"] == "resume" else r["replayed_tokens"] * 3),
            f"{r['refill_compute_ms']:.0f}" if r["how"] == "resume" else "-",
            f"{r['normal_step_ms']:.1f}",
            "yes" if r["same_output"] else "NO",
        )
    return t


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default=None, help="shard format (default: the checkpoint's own)")
    p.add_argument("--mode", choices=("spare", "resplit"), default="spare")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=7, help="where the kills land")
    p.add_argument("--prompt-tokens", type=int, default=100, help="context before generating")
    p.add_argument("--hot-spare", action="store_true", help="the spare holds the lost stage's weights")
    p.add_argument(
        "--compare-replay", action="store_true", help="every other trial replays the whole history (old path)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per node (the replacement's refill uses them; every node the same: same bits)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    global PROMPT
    PROMPT = [1000 + i % 40000 for i in range(args.prompt_tokens)]
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    path = resolve_model(args.model)
    nodes = 4 if args.mode == "spare" else 3
    with LocalNodes(
        nodes, model_dir=path.parent, name="recov", threads=args.threads, node_args=["--no-benchmark"]
    ) as cluster:
        result = asyncio.run(main_async(args, path, cluster))
    trials = result["trials"]
    from rich.console import Console

    Console(width=140).print(_table(trials))
    waits = [r["kill_to_next_token_ms"] for r in trials if r["how"] == "resume"] or [0.0]
    replays = [r["kill_to_next_token_ms"] for r in trials if r["how"] == "replay"]
    loads = [r["load_ms"] for r in trials]
    summary = {
        "kill_to_next_token_ms": {"median": statistics.median(waits), "worst": max(waits)},
        **(
            {
                "full_replay_kill_to_next_token_ms": {
                    "median": statistics.median(replays),
                    "worst": max(replays),
                }
            }
            if replays
            else {}
        ),
        "recovery_load_ms": {"median": statistics.median(loads), "worst": max(loads)},
        "cold_shard_load_ms": {"median": statistics.median(result["cold_load_s"]) * 1e3},
        "normal_step_ms": statistics.median(r["normal_step_ms"] for r in trials),
        "all_outputs_identical": all(r["same_output"] for r in trials),
    }
    print(
        f"kill -> next token: median {summary['kill_to_next_token_ms']['median']:.0f} ms, worst "
        f"{summary['kill_to_next_token_ms']['worst']:.0f} ms; shard load in the recovery: median "
        f"{summary['recovery_load_ms']['median']:.0f} ms (cold load of a 10-layer shard at deploy: "
        f"{summary['cold_shard_load_ms']['median']:.0f} ms); a normal step {summary['normal_step_ms']:.1f} ms"
    )
    if replays:
        r = summary["full_replay_kill_to_next_token_ms"]["median"]
        print(
            f"full replay instead (interleaved trials, same run): median {r:.0f} ms, "
            f"{r / summary['kill_to_next_token_ms']['median']:.1f}x the resume"
        )
    report = {
        "model": args.model,
        "quant": args.quant or "default",
        "mode": args.mode,
        "tokens": args.tokens,
        "prompt_tokens": len(PROMPT),
        "machine": {
            "arch": platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "cpu": _cpu_name(),
            "load_avg_at_start": LOAD_AT_START,
            "threads_per_node": args.threads,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "summary": {
            k: ({kk: round(vv, 1) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in summary.items()
        },
        "trials": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in trials],
    }
    runs = {}  # one entry per mode and format: a spare run does not erase the re-split one
    with contextlib.suppress(FileNotFoundError, ValueError, AttributeError):
        runs = dict(json.loads(args.out.read_text()).get("runs", {}))
    key = f"{args.mode}-{report['quant']}"
    if args.prompt_tokens != 100 or args.hot_spare:
        key += f"-{args.prompt_tokens}tok" + ("-hot" if args.hot_spare else "")
    key += "-vs-replay" if args.compare_replay else ""
    key += f"-t{args.threads}" if args.threads != 1 else ""
    runs[key] = report
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
