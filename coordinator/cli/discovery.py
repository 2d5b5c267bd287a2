"""The `nodes`, `plan` and `doctor` subcommands.

edgeshard nodes --timeout 3                       # what mDNS finds now, confirmed over gRPC
edgeshard plan --model smollm2-135m --discover    # where the layers would go, and the predicted speed
edgeshard plan --model M --peers a:50051,b:50051 --layers 20,10 --json
edgeshard doctor                                  # multicast, ports, duplicate ids, versions, clocks
"""

from __future__ import annotations

import argparse
import asyncio
import json

from edgeshard.coordinator.cli.options import (
    add_mdns_args,
    add_model_args,
    add_placement_args,
    placement_options,
)


def add_nodes_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`nodes`: what mDNS finds now, confirmed over gRPC."""
    nodes = sub.add_parser("nodes", help="the nodes mDNS finds now, with what they report")
    add_mdns_args(nodes)
    nodes.add_argument("--all-clusters", action="store_true", help="list nodes of every cluster name")
    nodes.add_argument("--json", action="store_true", help="one JSON list on stdout")
    nodes.set_defaults(func=cmd_nodes)
    return nodes


def add_plan_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`plan`: the placement dry run."""
    plan = sub.add_parser("plan", help="placement dry run: layers per node, memory, predicted ms and tok/s")
    add_model_args(plan)
    where = plan.add_mutually_exclusive_group()
    where.add_argument("--peers", help="comma-separated node addresses host:port (instead of mDNS)")
    where.add_argument("--discover", action="store_true", help="find nodes with mDNS (the default)")
    add_placement_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    plan.set_defaults(func=cmd_plan)
    return plan


def add_doctor_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`doctor`: is the cluster healthy enough to plan on?"""
    doctor = sub.add_parser("doctor", help="check multicast, ports, duplicate ids, version skew and clocks")
    add_mdns_args(doctor)
    doctor.add_argument("--peers", help="also check these node addresses host:port,...")
    doctor.add_argument("--json", action="store_true", help="the checks as JSON on stdout")
    doctor.set_defaults(func=cmd_doctor)
    return doctor


def cmd_nodes(args: argparse.Namespace) -> int:
    """`edgeshard nodes`."""
    from edgeshard.coordinator.discovery.mdns import ZeroconfDiscovery, duplicate_ids

    args.timeout = placement_options(args).timeout  # the default when not given

    async def browse():
        d = ZeroconfDiscovery(
            args.mdns_interface, None if args.all_clusters else args.cluster, watch_interval=0
        )
        try:
            return await d.browse(args.timeout), dict(d.ignored), dict(d.strangers)
        finally:
            await d.close()

    members, ignored, strangers = asyncio.run(browse())
    dups = duplicate_ids(members)
    if args.json:
        rows = [{**member_fields(m), "duplicate_id": m.node_id in dups} for m in members]
        print(json.dumps(rows))
        return 0
    from rich.console import Console

    console = Console()
    if strangers:  # adverts without this cluster key's proof: never dialled (docs/security.md)
        console.print(
            f"{len(strangers)} advert(s) without this cluster key's proof ignored (another or stale key, "
            "--insecure nodes, or impostors): "
            + "; ".join(f"{n.split('.')[0]}: {w}" for n, w in strangers.items()),
            soft_wrap=True,
        )
    if not members:
        console.print(
            f"no edgeshard nodes of cluster {args.cluster!r} answered within {args.timeout:g} s"
            + (f" ({len(ignored)} of other clusters; --all-clusters lists them)" if ignored else "")
            + ". Start `edgeshard node` on each board, or run `edgeshard doctor`."
        )
        return 0
    console.print(members_table(members, dups))
    if ignored:
        console.print(f"{len(ignored)} node(s) of other clusters not shown (--all-clusters lists them)")
    return 0


def loaded_range(loaded: str) -> tuple[int, int, int] | None:
    """(start_layer, end_layer, num_layers) of a member's `loaded` ("start-end/num", end exclusive)."""
    try:
        span, num = loaded.split("/")
        start, end = span.split("-")
        return int(start), int(end), int(num)
    except ValueError:
        return None


def member_fields(m) -> dict:
    """One row of `nodes --json`: every field of the member plus the names the other JSON outputs use
    (`node`, and the layer range as `start_layer`/`end_layer`, end exclusive as in `run --json`, `plan --json`
    and /v1/cluster; null when nothing is loaded)."""
    span = loaded_range(m.loaded)
    return {
        "node": m.name,
        **m.to_dict(),
        "start_layer": span[0] if span else None,
        "end_layer": span[1] if span else None,
        "num_layers": span[2] if span else None,
    }


def members_table(members, dups=None):
    """A rich table of discovered members (one row each; `--json` has every field)."""
    from rich.table import Table

    from edgeshard.node.presence.capability import format_bytes

    table = Table(title="edgeshard nodes")
    for column in ("node", "address"):  # never cut: a cut address cannot be copied into --peers
        table.add_column(column, no_wrap=True, min_width=len(column))
    for column in ("status", "cpu", "memory", "speed", "layers"):
        table.add_column(column, overflow="fold")
    table.add_column("id", no_wrap=True)
    for m in members:
        cap = m.capability
        status = m.status + (", duplicate id" if m.node_id in (dups or {}) else "")
        if m.problem:
            status = f"[red]{status}[/]: {m.problem}"
        cpu = f"{cap.threads}/{cap.cores} thr {cap.arch}" if cap else "-"
        memory = "-"
        if cap:
            memory = f"{format_bytes(cap.memory_free)} free" + (
                f", limit {format_bytes(cap.memory_limit)}" if cap.memory_limit else ""
            )
        speed = (
            f"int4 {cap.int4_gbps:.1f} GB/s, +{cap.layer_overhead_ms:.2f} ms/layer"
            if cap and cap.measured
            else "-"
        )
        span = loaded_range(m.loaded)  # shown inclusive, as every table and plan shows layers
        layers = f"{span[0]}-{span[1] - 1} of {span[2]}" if span else "-"
        table.add_row(m.name, m.address, status, cpu, memory, speed, layers, m.node_id[:8])
    return table


def cmd_plan(args: argparse.Namespace) -> int:
    """`edgeshard plan`: print where the layers would go and the predicted speed; nothing is loaded."""
    from edgeshard.coordinator.placement.gather import plan_for
    from edgeshard.node.weights.registry import resolve_model

    opts = placement_options(args, layers=args.layers or "auto")
    plan = asyncio.run(plan_for(opts, args.model, resolve_model(args.model), args.quant, show=False))
    if args.json:
        print(json.dumps(plan.to_dict()))
        return 0
    print(plan.explain())
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """`edgeshard doctor`: exit 0 when every check passes, 1 otherwise."""
    from edgeshard.coordinator.cli.doctor import print_report, run_checks

    checks = asyncio.run(run_checks(placement_options(args)))
    if args.json:
        print(json.dumps([c.to_dict() for c in checks]))
    else:
        print_report(checks)
    return 0 if all(c.ok for c in checks) else 1
