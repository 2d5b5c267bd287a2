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
    add_take_over_arg,
    add_where_args,
    claim_nodes,
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
    add_template_args(run)
    add_sampling_args(run)
    add_where_args(run, "run every layer in this process")
    run.add_argument(
        "--threads", type=int, default=None, help="torch threads for --local (default: all cores)"
    )
    run.add_argument("--json", action="store_true", help="print a JSON summary on the last line")
    add_take_over_arg(run)
    add_placement_args(run)
    add_speculative_args(run)
    run.set_defaults(func=cmd_run)
    return run


def add_template_args(p: argparse.ArgumentParser) -> None:
    """--raw (and --chat, kept for scripts): whether the prompt goes through the model's chat template."""
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as plain text (default: through the model's chat template when it has one, "
        "as llama.cpp's CLI and ollama do)",
    )
    p.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the default now; still accepted


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of the prompt: through the chat template when `chat` (`run`: unless --raw) and the model
    has one.

    An instruct model given bare text often ends at once (its first token is end-of-turn): the template is
    what it was trained on, so it is the default; `--raw` is for base models and for exact-text experiments.
    """
    if chat and tokenizer.chat_template:
        return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def check_fits(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    """Refuse before any work a prompt plus --max-tokens that the model's context cannot hold (as HTTP does)."""
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if prompt_tokens + max_tokens > context_length:
        raise UserError(
            f"the prompt has {prompt_tokens} tokens and --max-tokens asks for {max_tokens}, but this model's "
            f"context holds {context_length}; shorten the prompt or lower --max-tokens"
        )


def cmd_run(args: argparse.Namespace) -> int:
    claim_nodes(args, "run")
    if args.local or not (args.peers or args.discover):
        return asyncio.run(_run_local(args))
    return asyncio.run(run_remote(args))


def loading(what: str):
    """A spinner on stderr while something a person waits for loads (nothing when stderr is not a terminal)."""
    from rich.console import Console

    return Console(stderr=True).status(what, spinner="dots")


async def _run_local(args: argparse.Namespace) -> int:
    import torch

    from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline
    from edgeshard.node.model.config import ShardSpec
    from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.loader import load_stage, stage_weight_bytes
    from edgeshard.node.weights.registry import resolve_model
    from edgeshard.node.weights.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    # the tokenizer reads the metadata the checkpoint already parsed: one open of the file
    tokenizer = (
        Tokenizer.from_gguf(ckpt.reader) if hasattr(ckpt, "reader") else Tokenizer.from_checkpoint(path)
    )
    ids = prompt_ids(tokenizer, args.prompt, not args.raw)
    check_fits(len(ids), args.max_tokens, ckpt.config.max_position_embeddings)  # before the weights load
    with loading(f"loading {path.name} ({ckpt.config.num_hidden_layers} layers) in this process"):
        stage = load_stage(ckpt, ShardSpec.full(ckpt.config.num_hidden_layers), quant=args.quant)
    load_s = time.perf_counter() - t0
    pipeline = AsyncLocalPipeline(LocalPipeline([ShardExecutor(stage)]))
    plan = [
        {
            "node": "local",
            "address": None,
            "start_layer": 0,
            "end_layer": ckpt.config.num_hidden_layers,
            "quant": stage.quant,
            "weight_bytes": stage_weight_bytes(stage),
        }
    ]
    return await stream_generation(args, pipeline, tokenizer, plan, extra={"load_s": round(load_s, 3)})


MIN_TOKENS_TO_JUDGE = 8  # fewer decoded tokens say too little about the speed to warn about it
SPEED_TOLERANCE = 2.0  # measured within this factor of the prediction: no warning


def speed_warning(measured: float, predicted: float, tolerance: float = SPEED_TOLERANCE) -> str | None:
    """A sentence when the measured decode speed strays more than `tolerance`x from the plan's prediction."""
    if measured <= 0 or predicted <= 0:
        return None
    ratio = measured / predicted
    if 1 / tolerance <= ratio <= tolerance:
        return None
    how = f"{ratio:.1f}x faster" if ratio > 1 else f"{1 / ratio:.1f}x slower"
    return (
        f"decoding ran at {measured:.1f} tok/s, {how} than the plan predicted ({predicted:.1f} tok/s): the "
        "nodes' benchmark figures do not match how they run now (other work on them, or a disturbed "
        "measurement); `edgeshard nodes` shows their figures, which they re-measure while idle"
    )


async def stream_generation(
    args, pipeline, tokenizer, plan: list[dict], extra: dict | None = None, context_length: int | None = None
) -> int:
    """Generate for `args.prompt` on `pipeline`, printing text as it comes; `--json` adds the summary line."""
    from edgeshard.coordinator.pipeline.generate import Sequence, generate

    sampling = sampling_params(args)
    ids = prompt_ids(tokenizer, args.prompt, not getattr(args, "raw", False))
    check_fits(len(ids), args.max_tokens, context_length or 1 << 62)
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
    predicted = (extra or {}).get("predicted_tok_per_s")
    if predicted and len(seq.generated) >= MIN_TOKENS_TO_JUDGE:
        warning = speed_warning(seq.decode_tok_per_s, predicted)
        if warning:
            print(f"edgeshard: warning: {warning}", file=sys.stderr)
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
    from edgeshard.coordinator.discovery.members import parse_peers, refuse_revoked
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
    config = open_checkpoint(path).config
    num_layers = config.num_hidden_layers
    tokenizer = Tokenizer.from_checkpoint(path)
    check_fits(
        len(prompt_ids(tokenizer, args.prompt, not args.raw)), args.max_tokens, config.max_position_embeddings
    )
    specs, extra, plan = None, {}, None
    if planned:
        plan = await plan_for(opts, args.model, path, args.quant)
        peers, specs = plan.addresses(), plan.specs()
        extra = {"predicted_ms_per_token": plan.latency_ms, "predicted_tok_per_s": round(plan.tok_per_s, 2)}
    if not planned:  # (planned members were confirmed: a revoked node is never planned with)
        await refuse_revoked(peers)
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
                context_length=config.max_position_embeddings,
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
