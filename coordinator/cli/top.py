"""`edgeshard top`: the dashboard's figures in the terminal, live (rich), read from a server's /v1/cluster.

    edgeshard top                                  # the server on this machine, refreshed every second
    edgeshard top --url http://teacher:8000 --api-key KEY
    edgeshard top --once                           # one table (after two reads, so the rates are real)

Per node, in ring order: name, address, layers, CPU and memory, format, how busy its stage was over the last
interval, compute / network / queue milliseconds per step, open sequences, KV memory. Rates are differences
between two reads (as the web page computes them), not averages since the shard loaded, so they move while a
generation runs and settle to 0 when the cluster is idle.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from edgeshard.coordinator.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000"


def add_top_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`top`: a live view of a running server's cluster."""
    p = sub.add_parser("top", help="live view of a server's nodes: layers, load, ms per step, KV memory")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help="sent as a bearer token (default: $EDGESHARD_API_KEY)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reads (default 1)")
    p.add_argument("--once", action="store_true", help="print one table and exit (no live view)")
    p.set_defaults(func=cmd_top)
    return p


def fetch(client, url: str) -> dict:
    """/v1/cluster of the server, or a UserError saying what to do."""
    import httpx

    try:
        r = client.get(url.rstrip("/") + "/v1/cluster")
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach {url} ({e}); is `edgeshard serve` running there?") from None
    if r.status_code == 401:
        raise UserError("the server wants an API key: pass --api-key KEY (or set EDGESHARD_API_KEY)")
    if r.status_code != 200:
        raise UserError(f"{url}/v1/cluster answered HTTP {r.status_code}: {r.text[:200]}")
    return r.json()


def rates(node: dict, prev: dict | None) -> dict[str, float | None]:
    """Busy fraction and ms per step over the interval since `prev` (the same node's previous figures);
    without one, the averages since the shard loaded."""
    out: dict[str, float | None] = {
        "busy": node.get("utilization"),
        "compute": node.get("compute_ms_per_step"),
        "network": node.get("network_ms_per_step"),
    }
    if prev is None or "compute_ms" not in node or "compute_ms" not in prev:
        return out
    steps = node.get("steps", 0) - prev.get("steps", 0)
    if steps > 0:
        out["compute"] = (node["compute_ms"] - prev["compute_ms"]) / steps
        if "network_ms" in node and "network_ms" in prev:
            out["network"] = (node["network_ms"] - prev["network_ms"]) / steps
    wall = node.get("wall_ms", 0) - prev.get("wall_ms", 0)
    if wall > 0:
        out["busy"] = (node["compute_ms"] - prev["compute_ms"]) / wall
    return out


def _key(n: dict, i: int) -> str:
    return n.get("address") or f"{n.get('node')}#{i}"


def render(info: dict, prev: dict | None = None, dt: float = 0.0):
    """The view of one read (`prev`: the read `dt` seconds before, for rates)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from edgeshard.node.presence.capability import format_bytes

    eng = info.get("engine", {})
    rec = info.get("recovery") or {}
    state = rec.get("state") or ("serving" if info.get("nodes") else "waiting for a plan")
    tps = "–"
    if prev is not None and dt > 0:
        made = eng.get("generated_tokens", 0) - prev.get("engine", {}).get("generated_tokens", 0)
        tps = f"{max(0, made) / dt:.1f}"
    nodes = info.get("nodes", [])
    kv = sum(n.get("kv_bytes", 0) for n in nodes)
    head = Text.assemble(
        ("edgeshard ", "bold"),
        (f"{info.get('model', '')}  ", "cyan"),
        f"{tps} tok/s · {eng.get('running', 0)} generating · {eng.get('queued', 0)} queued · "
        f"{eng.get('generated_tokens', 0)} tokens · KV {format_bytes(kv)} · ",
        (state, "green" if state == "serving" else "yellow"),
    )
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (
        ("node", "left"),
        ("address", "left"),
        ("layers", "left"),
        ("cpu", "left"),
        ("mem free", "right"),
        ("fmt", "left"),
        ("busy", "right"),
        ("compute", "right"),
        ("network", "right"),
        ("queue", "right"),
        ("seqs", "right"),
        ("KV", "right"),
        ("status", "left"),
    ):
        table.add_column(col, justify=justify)
    before = {_key(n, i): n for i, n in enumerate((prev or {}).get("nodes", []))}
    liveness = rec.get("nodes", {})
    for i, n in enumerate(nodes):
        r = rates(n, before.get(_key(n, i)))
        live = liveness.get(n.get("address"), {}).get("state", "up")
        down = n.get("status") == "unreachable" or live not in ("up",)
        status = Text("down" if n.get("status") == "unreachable" else live, "red" if down else "green")
        ms = lambda v: "–" if v is None else f"{v:.1f} ms"  # noqa: E731
        table.add_row(
            str(n.get("name") or n.get("node")),
            n.get("address") or "(in process)",
            f"{n.get('start_layer')}–{n.get('end_layer', 0) - 1}",
            f"{n['arch']} ×{n['cores']}" if n.get("arch") else "",
            format_bytes(n["memory_free"]) if n.get("memory_free") else "",
            str(n.get("quant", "")),
            "–" if r["busy"] is None or down else f"{100 * r['busy']:.0f}%",
            "–" if down else ms(r["compute"]),
            "–" if down else ms(r["network"]),
            "–" if down else ms(n.get("queue_ms_per_step")),
            str(n.get("sessions", "–")),
            format_bytes(n.get("kv_bytes", 0)),
            status,
        )
    parts: list[Any] = [head, table]
    for event in rec.get("recoveries", [])[-3:]:
        parts.append(Text(f"recovery: {', '.join(event.get('nodes', []))} → {event.get('outcome')}", "dim"))
    return Group(*parts)


def cmd_top(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    if args.interval <= 0:
        raise UserError(f"--interval must be > 0 seconds, got {args.interval}")
    key = args.api_key or os.environ.get("EDGESHARD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    console = Console()
    with httpx.Client(headers=headers, timeout=10) as client:
        prev, t_prev = fetch(client, args.url), time.monotonic()
        if args.once:
            time.sleep(args.interval)
            info, now = fetch(client, args.url), time.monotonic()
            console.print(render(info, prev, now - t_prev))
            return 0
        with Live(render(prev), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                try:
                    info, now = fetch(client, args.url), time.monotonic()
                except UserError as e:  # the server restarts, the Wi-Fi drops: say so and keep trying
                    live.update(Group(render(prev), Text(f"{e}; retrying", "red")), refresh=True)
                    continue
                live.update(render(info, prev, now - t_prev), refresh=True)
                prev, t_prev = info, now
