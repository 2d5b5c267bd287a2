"""`edgeshard run`: one generation, streamed to stdout as it is made (in this process, or over nodes).

edgeshard run --local --model smollm2-135m --prompt "Why is the sky blue?"
edgeshard run --peers a:50051,b:50051 --model smollm2-135m --prompt "Hello" --json
edgeshard run --discover --model smollm2-135m --prompt "Hello"      # mDNS + the planner
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from edgeshard.coordinator.cli.options import (
    add_model_args,
    add_placement_args,
    add_sampling_args,
    add_speculative_args,
    add_where_args,
    placement_options,
    sampling_params,
    speculation_factory,
)
from edgeshard.coordinator.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`run` and its flags."""
    run = sub.add_parser(
        "run",
        help="one generation, streamed to stdout",
        epilog="--discover finds the nodes with mDNS, measures them and lets the planner place the layers; "
        "--peers with --layers does the same for given nodes.",
    )
    add_model_args(run)
    run.add_argument("--prompt", required=True)
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_args(run)
    add_where_args(run, "run every layer in this process")
    run.add_argument(
        "--threads", type=int, default=None, help="torch threads for --local (default: all cores)"
    )
    run.add_argument("--json", action="store_true", help="print a JSON summary on the last line")
    add_placement_args(run)
    add_speculative_args(run)
    run.set_defaults(func=cmd_run)
    return run


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt, through the chat template when `chat`."""
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def cmd_run(args: argparse.Namespace) -> int:
    if args.local or not (args.peers or args.discover):
        return asyncio.run(_run_local(args))
    return asyncio.run(run_remote(args))


async def _run_local(args: argparse.Namespace) -> int:
    import torch

    from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline
    from edgeshard.node.model.config import ShardSpec
    from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.loader import load_stage
    from edgeshard.node.weights.registry import resolve_model
    from edgeshard.node.weights.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    stage = load_stage(ckpt, ShardSpec.full(ckpt.config.num_hidden_layers), quant=args.quant)
    # the tokenizer reads the metadata the checkpoint already parsed: one open of the file
    tokenizer = (
        Tokenizer.from_gguf(ckpt.reader) if hasattr(ckpt, "reader") else Tokenizer.from_checkpoint(path)
    )
    load_s = time.perf_counter() - t0
    pipeline = AsyncLocalPipeline(LocalPipeline([ShardExecutor(stage)]))
    plan = [
        {
            "node": "local",
            "address": None,
            "start_layer": 0,
            "end_layer": ckpt.config.num_hidden_layers,
            "quant": stage.quant,
        }
    ]
    return await stream_generation(args, pipeline, tokenizer, plan, extra={"load_s": round(load_s, 3)})


async def stream_generation(args, pipeline, tokenizer, plan: list[dict], extra: dict | None = None) -> int:
    """Generate for `args.prompt` on `pipeline`, printing text as it comes; `--json` adds the summary line."""
    from edgeshard.coordinator.pipeline.generate import Sequence, generate

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    sampling = sampling_params(args)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    seq = Sequence(ids, sampling, args.max_tokens, frozenset(tokenizer.stop_token_ids))
    make_speculation = speculation_factory(args)
    if make_speculation is not None:
        seq.speculation = make_speculation()
    stream = tokenizer.decode_stream()
    async for token in generate(pipeline, seq):
        piece = stream.step(token)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = stream.flush()
    if tail:
        sys.stdout.write(tail)
    sys.stdout.write("\n")
    if args.json:
        summary = {
            "text": tokenizer.decode(seq.generated),
            "tokens": seq.generated,
            "prompt_tokens": len(ids),
            "completion_tokens": len(seq.generated),
            "finish_reason": seq.finish_reason,
            "ttft_s": round(seq.ttft_s, 4),
            "decode_tok_per_s": round(seq.decode_tok_per_s, 2),
            "draft_proposed": seq.draft_proposed,  # speculative decoding: proposed tokens checked
            "draft_accepted": seq.draft_accepted,
            "plan": plan,
            **(extra or {}),
        }
        print(json.dumps(summary))
    return 0


async def run_remote(args: argparse.Namespace) -> int:
    """`edgeshard run --peers ...`: deploy over the peers and stream one generation to stdout."""
    from edgeshard.coordinator.discovery.members import parse_peers
    from edgeshard.coordinator.pipeline.deploy import deploy
    from edgeshard.coordinator.placement.gather import node_model_ref, plan_for
    from edgeshard.coordinator.recovery.resilient import resilient
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.registry import resolve_model
    from edgeshard.node.weights.tokenizer import Tokenizer

    opts = placement_options(args)
    planned = args.discover or args.layers  # the planner places the layers (placement/gather.py)
    if not planned:
        try:
            peers = parse_peers(args.peers)
        except ValueError as e:
            raise UserError(str(e)) from None
    path = resolve_model(args.model)  # the coordinator needs the tokenizer (and the layer count) locally
    num_layers = open_checkpoint(path).config.num_hidden_layers
    tokenizer = Tokenizer.from_checkpoint(path)
    specs, extra, plan = None, {}, None
    if planned:
        plan = await plan_for(opts, args.model, path, args.quant)
        peers, specs = plan.addresses(), plan.specs()
        extra = {"predicted_ms_per_token": plan.latency_ms, "predicted_tok_per_s": round(plan.tok_per_s, 2)}
    deployment = await deploy(
        peers, node_model_ref(args.model), num_layers, args.quant, specs=specs, source=path
    )  # nodes lacking the model get their stage's tensors shipped from `path`
    try:
        # a node that dies mid-generation costs a pause, not the run: the layers move to the nodes left
        # (--peers, or what mDNS finds then), and `recoveries` in --json says what happened
        candidates = parse_peers(args.peers) if args.peers else _discovered(opts) if args.discover else peers
        pipeline = resilient(deployment, await deployment.pipeline(), path, plan=plan, candidates=candidates)
        try:
            return await stream_generation(
                args,
                pipeline,
                tokenizer,
                deployment.plan,
                extra={
                    "load_s": round(max(deployment.load_s), 3),
                    **extra,
                    "recoveries": pipeline.recoveries,  # filled in as they happen
                },
            )
        finally:
            await pipeline.aclose()
    finally:
        await deployment.close()


def _discovered(opts):
    """Candidates for a re-placement with --discover: the usable nodes mDNS finds at that moment."""

    async def candidates() -> list[str]:
        from edgeshard.coordinator.placement.gather import gather_members

        return [m.address for m in await gather_members(opts) if m.ok]

    return candidates
