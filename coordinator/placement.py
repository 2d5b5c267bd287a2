"""From "which nodes" to a `Plan`: gather members (mDNS or --peers), measure links, run the planner.

This is what `plan`, `run --discover` (and `run --peers --layers ...`) share. The CLI flags that steer it
are added by `add_placement_args`; `plan_for_args` does the work and prints the plan on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeshard.node.capability import Capability
from edgeshard.node.cost import ModelCost

from .discovery import Member, StaticDiscovery, ZeroconfDiscovery, duplicate_ids
from .links import measure_links
from .plan import Plan, PlanError
from .planner import DEFAULT_CONTEXT, OBJECTIVES, PlanNode, make_plan

DEFAULT_TIMEOUT_S = 3.0


def _arg(p: argparse.ArgumentParser, *names: str, **kw) -> None:
    """add_argument unless the parser already has the option (another module may have added it first)."""
    if names[0] not in p._option_string_actions:
        p.add_argument(*names, **kw)


def add_mdns_args(p: argparse.ArgumentParser) -> None:
    """--timeout, --mdns-interface, --cluster: where and how long to look for nodes."""
    _arg(
        p,
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to listen for mDNS announcements (default {DEFAULT_TIMEOUT_S:g})",
    )
    _arg(
        p,
        "--mdns-interface",
        action="append",
        default=[],
        metavar="IP",
        help="IPv4 address of an interface to run mDNS on (repeatable; default: all interfaces)",
    )
    _arg(p, "--cluster", default="default", help="only nodes of this cluster name (default: default)")


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """The planner's flags (for `plan` and `run`; mDNS flags included)."""
    add_mdns_args(p)
    _arg(
        p,
        "--layers",
        default=None,
        metavar="N,N,...|auto|even",
        help="layers per node in node order (0 leaves one out), 'auto' for the planner, 'even' for an "
        "even split (default: auto with --discover and for `plan`; --peers alone splits evenly)",
    )
    _arg(
        p,
        "--context",
        type=int,
        default=DEFAULT_CONTEXT,
        metavar="N",
        help=f"positions of KV cache to budget per sequence (default {DEFAULT_CONTEXT})",
    )
    _arg(p, "--sessions", type=int, default=1, metavar="N", help="sequences to budget KV cache for")
    _arg(
        p,
        "--objective",
        choices=OBJECTIVES,
        default="latency",
        help="latency: fastest single sequence; throughput: smallest bottleneck stage (many sequences)",
    )


def parse_layers(text: str | None) -> list[int] | str | None:
    """'10,10,10' -> [10, 10, 10]; 'auto'/'even' as is; None stays None."""
    if text is None or text in ("auto", "even"):
        return text
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"--layers {text!r}: give layer counts like 10,10,10, or 'auto' or 'even'") from None
    if not counts:
        raise PlanError("--layers is empty: give layer counts like 10,10,10, or 'auto' or 'even'")
    return counts


async def gather_members(args: argparse.Namespace) -> list[Member]:
    """The nodes of `--peers` (in their order), else those mDNS finds within `--timeout` (by name)."""
    if getattr(args, "peers", None):
        from .stage_client import parse_peers

        try:
            peers = parse_peers(args.peers)
        except ValueError as e:
            raise PlanError(str(e)) from None
        return await StaticDiscovery(peers).browse()
    discovery = ZeroconfDiscovery(args.mdns_interface, args.cluster, watch_interval=0)
    try:
        return await discovery.browse(args.timeout)
    finally:
        await discovery.close()


def usable(members: list[Member], err=sys.stderr) -> list[Member]:
    """The members that may be planned with; the others are reported on `err`. PlanError when none."""
    for m in members:
        if not m.ok:
            print(f"edgeshard: skipping node {m.name} ({m.address}): {m.problem}", file=err)
    for node_id, same in duplicate_ids(members).items():
        names = ", ".join(f"{m.name} ({m.address})" for m in same)
        print(
            f"edgeshard: warning: {names} share node id {node_id[:8]}; delete node_id in the --state-dir of "
            "all but one",
            file=err,
        )
    ok = [m for m in members if m.ok]
    if not ok:
        where = "--peers" if members and members[0].source == "peers" else "mDNS"
        raise PlanError(
            f"no usable node found via {where}: start `edgeshard node` on each board (same "
            "--cluster), check `edgeshard doctor`, or list them with --peers host:port,..."
        )
    return ok


def plan_node(member: Member, link) -> PlanNode:
    """A confirmed member as the planner sees it (its current shard's memory counts as available)."""
    cap = member.capability or Capability()
    return PlanNode(member.key, member.name, member.address, cap, cap.memory_free + member.held_bytes, link)


async def plan_for_args(
    args: argparse.Namespace, model_path: Path, err=sys.stderr, show: bool = True
) -> Plan:
    """Gather nodes, measure links, and plan `args.model` on them as the flags say.

    Skipped nodes are reported on `err`, and so is the plan when `show`.
    """
    from edgeshard.node.checkpoint import open_checkpoint
    from edgeshard.node.loader import default_quant

    from .remote_run import node_model_ref

    ckpt = open_checkpoint(model_path)
    quant = args.quant or default_quant(ckpt)
    cost = ModelCost.of(ckpt.config, quant)
    members = usable(await gather_members(args), err)
    links = await measure_links([m.address for m in members])
    nodes = [plan_node(m, links[m.address]) for m in members]
    layers = parse_layers(getattr(args, "layers", None))
    if layers == "even":
        from edgeshard.node.config import even_split

        if len(nodes) > cost.num_layers:
            raise PlanError(f"{len(nodes)} nodes but only {cost.num_layers} layers: use --layers auto")
        layers = [s.end_layer - s.start_layer for s in even_split(cost.num_layers, len(nodes))]
    if args.context < 1 or args.sessions < 1:
        raise PlanError("--context and --sessions must be at least 1")
    plan = make_plan(
        nodes,
        cost,
        model=node_model_ref(args.model),
        context=args.context,
        sessions=args.sessions,
        objective=args.objective,
        layers=None if layers == "auto" else layers,
    )
    if show:
        print(plan.explain(), file=err)
    return plan
