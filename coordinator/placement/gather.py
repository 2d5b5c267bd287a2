"""From "which nodes" to a `Plan`: gather members (mDNS or --peers), measure links, run the planner.

This is what `plan`, `run --discover` (and `run --peers --layers ...`) and `serve` share. The CLI parses its
flags into `PlacementOptions` (cli/options.py); `plan_for` does the work and prints the plan on stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from edgeshard.coordinator.discovery.mdns import Member, StaticDiscovery, ZeroconfDiscovery, duplicate_ids
from edgeshard.coordinator.errors import PlanError
from edgeshard.coordinator.placement.links import measure_links
from edgeshard.coordinator.placement.plan import Plan
from edgeshard.coordinator.placement.planner import DEFAULT_CONTEXT, PlanNode, make_plan
from edgeshard.node.model.cost import ModelCost
from edgeshard.node.presence.capability import Capability

DEFAULT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PlacementOptions:
    """Which nodes to plan on and what to budget: the placement flags of `plan`, `run` and `serve` as data."""

    peers: str | None = None  # comma-separated host:port in pipeline order; None: find nodes with mDNS
    timeout: float = DEFAULT_TIMEOUT_S  # seconds to listen for mDNS announcements
    mdns_interfaces: tuple[str, ...] = ()  # IPv4 addresses of the interfaces mDNS runs on (empty: all)
    cluster: str = "default"  # only nodes advertising this cluster name
    layers: str | None = None  # "N,N,..." per node, "auto" (the planner) or "even"; None: auto
    context: int = DEFAULT_CONTEXT  # KV positions to budget per sequence
    sessions: int = 1  # sequences to budget KV memory for
    objective: str = "latency"  # one of planner.OBJECTIVES


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


async def gather_members(opts: PlacementOptions) -> list[Member]:
    """The nodes of `opts.peers` (in their order), else those mDNS finds within `opts.timeout` (by name)."""
    if opts.peers:
        from edgeshard.coordinator.discovery.members import parse_peers

        try:
            peers = parse_peers(opts.peers)
        except ValueError as e:
            raise PlanError(str(e)) from None
        return await StaticDiscovery(peers).browse()
    discovery = ZeroconfDiscovery(list(opts.mdns_interfaces), opts.cluster, watch_interval=0)
    try:
        return await discovery.browse(opts.timeout)
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


async def plan_for(
    opts: PlacementOptions,
    model: str,
    model_path: Path,
    quant: str | None = None,
    err=sys.stderr,
    show: bool = True,
) -> Plan:
    """Gather nodes, measure links, and plan `model` (read at `model_path`) on them as `opts` say.

    `quant`: the shards' weight format (None: the checkpoint's own). Skipped nodes are reported on `err`, and
    so is the plan when `show`.
    """
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.loader import checkpoint_quant

    ckpt = open_checkpoint(model_path)
    quant = quant or checkpoint_quant(ckpt)
    cost = ModelCost.of(ckpt.config, quant)
    members = usable(await gather_members(opts), err)
    links = await measure_links([m.address for m in members])
    nodes = [plan_node(m, links[m.address]) for m in members]
    layers = parse_layers(opts.layers or "auto")
    if layers == "even":
        from edgeshard.node.model.config import even_split

        if len(nodes) > cost.num_layers:
            raise PlanError(f"{len(nodes)} nodes but only {cost.num_layers} layers: use --layers auto")
        layers = [s.end_layer - s.start_layer for s in even_split(cost.num_layers, len(nodes))]
    if opts.context < 1 or opts.sessions < 1:
        raise PlanError("--context and --sessions must be at least 1")
    plan = make_plan(
        nodes,
        cost,
        model=node_model_ref(model),
        context=opts.context,
        sessions=opts.sessions,
        objective=opts.objective,
        layers=None if layers == "auto" else layers,
    )
    if show:
        print(plan.explain(), file=err)
    return plan


def node_model_ref(model: str) -> str:
    """What a remote node is told to open for `--model`: a registry name as is, a path by its name.

    Nodes open files only under their own --model-dir, so a path given to the coordinator is sent as its last
    component. A node without that file gets the tensors of its layers shipped from the coordinator's copy
    (`pipeline.deploy`, docs/shipping.md).
    """
    from edgeshard.node.weights.registry import REGISTRY

    return model if model in REGISTRY else Path(model).name
