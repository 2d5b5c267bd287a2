"""Speculative decoding benchmark: one request over 3 loopback nodes, with and without speculation.

Two tasks on the demo model (SmolLM2-135M-Instruct, its chat template, greedy): a grounded one, where the
answer repeats its input (repeat a passage: prompt lookup shines), and free story writing (little to look
up: speculation must not cost much). Each is run without speculation, with prompt lookup (`ngram`) and,
with --draft-model, with a draft model. Runs are interleaved (plain, ngram, model, plain, ...) so load from
other work on the machine hits them alike. Reported per task and mode (median over runs): decode tok/s
(tokens after the first), the ratio to plain decoding, and the acceptance rate (accepted / proposed).
Targets (issue #18): >= 1.5x on the grounded task, >= 0.95x on free writing.

    python benchmarks/speculative.py                       # 3 nodes, int4 shards, 96 tokens, 3 runs
    python benchmarks/speculative.py --quant f32 --draft-model smollm2-135m --runs 5
    python benchmarks/speculative.py --nodes 1             # one node

Writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
from pathlib import Path

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.pipeline.speculative import ModelDraft, NgramDraft, Speculation
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.registry import resolve_model
from edgeshard.node.weights.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "speculative.json"
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He polished the great lens, "
    "trimmed the wick, and lit the lamp so that ships far out at sea could find their way past the rocks. "
    "In winter the storms came from the north, and the keeper wrote in his log the hour each ship passed, "
    "the strength of the wind, and the height of the waves against the tower."
)
TASKS = {
    "grounded": f"Repeat the following passage word for word.\n\n{PASSAGE}",
    "free": "Write a short story about a robot who learns to paint.",
}


async def one(pipe, prompt: list[int], tokens: int, spec: Speculation | None) -> dict:
    seq = Sequence(prompt, SamplingParams(), tokens, speculation=spec)
    out = [t async for t in generate(pipe, seq)]
    return {
        "tokens": len(out),
        "decode_tok_per_s": seq.decode_tok_per_s,
        "proposed": seq.draft_proposed,
        "accepted": seq.draft_accepted,
        "ids": out,
    }


async def main_async(args: argparse.Namespace) -> dict:
    path = resolve_model(args.model)
    tok = Tokenizer.from_checkpoint(path)
    layers = open_checkpoint(path).config.num_hidden_layers
    prompts = {
        name: tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        for name, text in TASKS.items()
    }
    draft = ModelDraft.load(args.draft_model, quant="int4", threads=1) if args.draft_model else None
    modes = ["plain", "ngram", *(["model"] if draft else [])]
    rows: dict[tuple[str, str], list[dict]] = {}
    with LocalNodes(args.nodes, model_dir=path.parent, threads=args.threads, name="spec") as nodes:
        dep = await deploy(nodes.addresses, path.name, layers, args.quant)
        pipe = await dep.pipeline()
        try:
            for task, prompt in prompts.items():
                await one(pipe, prompt, 8, None)  # warm-up
                for _ in range(args.runs):
                    for mode in modes:
                        source = {"plain": None, "ngram": NgramDraft(), "model": draft}[mode]
                        spec = Speculation(source, k=args.draft_tokens) if source is not None else None
                        rows.setdefault((task, mode), []).append(await one(pipe, prompt, args.tokens, spec))
        finally:
            await pipe.aclose()
            await dep.close()
    table = []
    for task in prompts:
        base = statistics.median(r["decode_tok_per_s"] for r in rows[(task, "plain")])
        plain_ids = rows[(task, "plain")][0]["ids"]
        for mode in modes:
            runs = rows[(task, mode)]
            tps = statistics.median(r["decode_tok_per_s"] for r in runs)
            proposed = sum(r["proposed"] for r in runs)
            accepted = sum(r["accepted"] for r in runs)
            table.append(
                {
                    "task": task,
                    "mode": mode,
                    "decode_tok_per_s": round(tps, 2),
                    "vs_plain": round(tps / base, 3),
                    "acceptance": round(accepted / proposed, 3) if proposed else None,
                    "proposed_per_run": proposed // len(runs),
                    "same_tokens_as_plain": all(r["ids"] == plain_ids for r in runs),
                }
            )
    return {
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu(),
        "nodes": args.nodes,
        "quant": args.quant or "default",
        "threads_per_node": args.threads,
        "tokens": args.tokens,
        "runs": args.runs,
        "draft_tokens": args.draft_tokens,
        "draft_model": args.draft_model,
        "results": table,
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default=None, help="shard format (default: the checkpoint's own)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--draft-model", default=None, help="also run with this draft model (int4)")
    args = p.parse_args()
    out = asyncio.run(main_async(args))
    print(
        f"{out['nodes']} nodes, {out['quant']}, {out['tokens']} tokens, median of {out['runs']} ({out['cpu']})"
    )
    print(f"{'task':9} {'mode':6} {'tok/s':>7} {'vs plain':>8} {'accept':>7} {'same':>5}")
    for r in out["results"]:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(
            f"{r['task']:9} {r['mode']:6} {r['decode_tok_per_s']:7.1f} {r['vs_plain']:7.2f}x {acc:>7} "
            f"{'yes' if r['same_tokens_as_plain'] else 'no':>5}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
