"""The flags that several commands share, and their parsing into the small option values the library takes.

Every flag of a command is added where its parser is built (main.py's table names the builders); the
library below the CLI never sees an `argparse.Namespace`: it gets `PlacementOptions`, `SamplingParams`, ...

This module imports nothing of the library at its top: building a parser (for `COMMAND --help`) must not
load torch or the planner. Flag values that the library defines (weight formats, planner objectives) are
checked by argparse `type=` functions that import their home only when the flag is given, and the library's
defaults (mDNS timeout, KV context) are filled in by `placement_options` when the command runs.
"""

from __future__ import annotations

import argparse

from edgeshard.coordinator.errors import UserError


def quant_format(text: str) -> str:
    """argparse type of --quant: one of node/lowbit/formats.py's QUANT_FORMATS."""
    from edgeshard.node.lowbit.formats import QUANT_FORMATS

    if text not in QUANT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a weight format; choose from {', '.join(QUANT_FORMATS)}"
        )
    return text


def objective(text: str) -> str:
    """argparse type of --objective: one of the planner's OBJECTIVES."""
    from edgeshard.coordinator.placement.planner import OBJECTIVES

    if text not in OBJECTIVES:
        raise argparse.ArgumentTypeError(f"{text!r} is not an objective; choose from {', '.join(OBJECTIVES)}")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --quant."""
    p.add_argument(
        "--model",
        required=True,
        help="a .gguf file, a Hugging Face model directory, or a name from `models list`",
    )
    p.add_argument(
        "--quant",
        type=quant_format,
        metavar="{f32,bf16,int8,int4}",
        help="weight format of the shards (default: the checkpoint's own)",
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--max-tokens, --temperature, --top-p, --top-k, --seed."""
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def add_where_args(p: argparse.ArgumentParser, local_help: str) -> None:
    """--local | --peers | --discover: where the layers run."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help=local_help)
    where.add_argument("--peers", help="comma-separated node addresses host:port, in pipeline order")
    where.add_argument("--discover", action="store_true", help="find nodes with mDNS and plan the layers")


def add_take_over_arg(p: argparse.ArgumentParser) -> None:
    """--take-over: load nodes even when another coordinator's plan runs there."""
    p.add_argument(
        "--take-over",
        action="store_true",
        help="load nodes that serve another coordinator's plan (its requests then fail over); without it "
        "such nodes refuse and the error names their coordinator",
    )


def claim_nodes(args: argparse.Namespace, role: str) -> None:
    """Name this coordinator for the nodes it will hold, and pass on --take-over (pipeline/holder.py)."""
    from edgeshard.coordinator.pipeline import holder

    holder.set_role(f"edgeshard {role}")
    if getattr(args, "take_over", False):
        holder.ask_to_take_over()


def add_mdns_args(p: argparse.ArgumentParser) -> None:
    """--timeout, --mdns-interface, --cluster: where and how long to look for nodes."""
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds to listen for mDNS announcements (default 3)",
    )
    p.add_argument(
        "--mdns-interface",
        action="append",
        default=[],
        type=mdns_interface,
        metavar="IP",
        help="IPv4 address of an interface to run mDNS on (repeatable; default: all interfaces)",
    )
    p.add_argument("--cluster", default="default", help="only nodes of this cluster name (default: default)")


def mdns_interface(text: str) -> str:
    """argparse type of --mdns-interface: an IPv4 address of this machine (else a usage error, exit 2)."""
    from edgeshard.node.presence.advertise import interface_address

    return interface_address(text)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """The planner's flags (for `plan`, `run` and `serve`; the mDNS flags included)."""
    add_mdns_args(p)
    p.add_argument(
        "--layers",
        default=None,
        metavar="N,N,...|auto|even",
        help="layers per node in node order (0 leaves one out), 'auto' for the planner, 'even' for an "
        "even split (default: auto with --discover and for `plan`; --peers alone splits evenly)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="positions of KV cache to budget per sequence (default 2048)",
    )
    p.add_argument("--sessions", type=int, default=1, metavar="N", help="sequences to budget KV cache for")
    p.add_argument(
        "--objective",
        type=objective,
        default="latency",
        metavar="{latency,throughput}",
        help="latency: fastest single sequence; throughput: smallest bottleneck stage (many sequences)",
    )


def placement_options(args: argparse.Namespace, **override):
    """The placement flags of `args` as a `PlacementOptions` (flags a command lacks keep their defaults)."""
    from edgeshard.coordinator.placement.gather import DEFAULT_TIMEOUT_S, PlacementOptions
    from edgeshard.coordinator.placement.planner import DEFAULT_CONTEXT

    timeout, context = getattr(args, "timeout", None), getattr(args, "context", None)
    fields = {
        "peers": getattr(args, "peers", None),
        "timeout": DEFAULT_TIMEOUT_S if timeout is None else timeout,
        "mdns_interfaces": tuple(getattr(args, "mdns_interface", ()) or ()),
        "cluster": getattr(args, "cluster", "default"),
        "layers": getattr(args, "layers", None),
        "context": DEFAULT_CONTEXT if context is None else context,
        "sessions": getattr(args, "sessions", 1),
        "objective": getattr(args, "objective", "latency"),
    }
    fields.update(override)
    return PlacementOptions(**fields)


def sampling_params(args: argparse.Namespace):
    """`SamplingParams` of the sampling flags; a bad value is a `UserError`."""
    from edgeshard.node.model.sampling import SamplingParams

    try:
        return SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
    except ValueError as e:
        raise UserError(str(e)) from e


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    """--speculative and --draft-tokens (speculative decoding: several tokens per trip through the ring)."""
    p.add_argument(
        "--speculative",
        metavar="ngram|MODEL",
        default=None,
        help="propose tokens and check several per trip: 'ngram' (prompt lookup: strong when the answer "
        "repeats its input) or a draft model with the same tokenizer (a path or `models list` name)",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        default=4,
        metavar="K",
        help="proposed tokens per trip to start with (adapts per request to what is accepted; default 4)",
    )


def speculation_factory(args: argparse.Namespace):
    """None without --speculative; else a function making each request's `Speculation` (one draft source,
    loaded once, shared by all requests). A bad value is a `UserError`."""
    which = getattr(args, "speculative", None)
    if not which:
        return None
    from edgeshard.coordinator.pipeline.speculative import MAX_DRAFT_TOKENS, Speculation, draft_source
    from edgeshard.node.weights.registry import resolve_model
    from edgeshard.node.weights.tokenizer import Tokenizer

    k = args.draft_tokens
    if not 1 <= k <= MAX_DRAFT_TOKENS:
        raise UserError(f"--draft-tokens must be in [1, {MAX_DRAFT_TOKENS}], got {k}")
    target = Tokenizer.from_checkpoint(resolve_model(args.model)) if which != "ngram" else None
    try:
        source = draft_source(which, target, threads=getattr(args, "threads", None))
    except ValueError as e:
        raise UserError(f"--speculative {which}: {e}") from None
    return lambda: Speculation(source, k=k)
