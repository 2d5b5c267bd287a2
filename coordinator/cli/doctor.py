"""`edgeshard doctor`: is the cluster healthy enough to plan on? One check per line, each with a fix.

multicast      an mDNS record registered here is seen by a second mDNS instance here (on the chosen
               interfaces; loopback when none are given, so the self-test never depends on the LAN)
discovery      nodes answer on mDNS (on the chosen interfaces; all of them when none are given)
port           each node's gRPC port answers GetInfo, and the link round trip
duplicate id   no two nodes announce the same node id
version        every node speaks this coordinator's protocol (and the same package version)
clock          each node's clock is within a second of ours (logs and traces line up)
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from dataclasses import asdict, dataclass

from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from edgeshard.coordinator.discovery.mdns import Member, StaticDiscovery, ZeroconfDiscovery, duplicate_ids
from edgeshard.coordinator.placement.gather import PlacementOptions
from edgeshard.node.presence.advertise import make_zeroconf, package_version

SELF_TEST_TYPE = "_esdoctor._tcp.local."  # its own type: the self-test never shows up as a node
CLOCK_SKEW_S = 1.0


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # not fatal: reported, does not fail the run

    def to_dict(self) -> dict:
        """JSON-friendly."""
        return asdict(self)


async def multicast_self_test(interfaces: list[str], timeout: float = 5.0) -> Check:
    """Register a record with one mDNS instance and wait for another instance to see it."""
    where = ", ".join(interfaces)
    record = f"doctor-{uuid.uuid4().hex[:8]}.{SELF_TEST_TYPE}"
    seen = asyncio.Event()
    host = interfaces[0]
    announcer, listener = make_zeroconf(interfaces), make_zeroconf(interfaces)
    info = AsyncServiceInfo(SELF_TEST_TYPE, record, port=9, addresses=[socket.inet_aton(host)])

    def on_change(zeroconf, service_type, name, state_change) -> None:  # zeroconf passes these by keyword
        if name == record and state_change is ServiceStateChange.Added:
            seen.set()

    browser = AsyncServiceBrowser(listener.zeroconf, SELF_TEST_TYPE, handlers=[on_change])
    t0 = time.perf_counter()
    try:
        await announcer.async_register_service(info)
        await asyncio.wait_for(seen.wait(), timeout)
        ok = True
    except (TimeoutError, asyncio.TimeoutError, OSError):
        ok = False
    finally:
        await browser.async_cancel()
        await announcer.async_unregister_all_services()
        await announcer.async_close()
        await listener.async_close()
    if ok:
        return Check(
            "multicast", True, f"mDNS works on {where} (record seen after {time.perf_counter() - t0:.1f} s)"
        )
    return Check(
        "multicast",
        False,
        f"an mDNS record announced on {where} was not seen within {timeout:g} s",
        "multicast is blocked: allow UDP 5353 to 224.0.0.251 in the firewall, check the interface has "
        "MULTICAST (`ip link`) and a route for 224.0.0.0/4; or use --peers",
    )


def member_checks(members: list[Member]) -> list[Check]:
    """Per node: port, version, clock; and duplicate ids across nodes."""
    checks = []
    ours = package_version()
    for m in members:
        if m.status == "unreachable":
            checks.append(Check(f"port {m.name}", False, f"{m.address} does not answer", m.problem))
            continue
        if m.status == "untrusted":  # TLS or the call token failed: another cluster key
            fix = "give this node and this coordinator the same --cluster-key-file (docs/security.md)"
            checks.append(Check(f"key {m.name}", False, m.problem, fix))
            continue
        if m.status == "revoked":  # its certificate is on the revocation list (#20)
            fix = (
                "stop the board, or re-enrol it: `edgeshard secret enrol NAME --out FILE` (docs/security.md)"
            )
            checks.append(Check(f"key {m.name}", False, m.problem, fix))
            continue
        checks.append(Check(f"port {m.name}", True, f"{m.address} answers GetInfo in {m.rtt_ms:.1f} ms"))
        if m.status == "version":
            checks.append(Check(f"version {m.name}", False, m.problem, "install the same edgeshard version"))
        elif m.version and m.version != ours:
            checks.append(
                Check(
                    f"version {m.name}",
                    True,
                    f"edgeshard {m.version} here {ours} (same protocol)",
                    "upgrade both to the same version",
                    warning=True,
                )
            )
        else:
            checks.append(Check(f"version {m.name}", True, f"protocol v{m.protocol}, edgeshard {m.version}"))
        if m.status == "cluster":
            checks.append(Check(f"cluster {m.name}", False, m.problem))
        skew = abs(m.clock_offset_s)
        checks.append(
            Check(
                f"clock {m.name}",
                skew <= CLOCK_SKEW_S,
                f"{m.clock_offset_s:+.3f} s from ours",
                "" if skew <= CLOCK_SKEW_S else "enable NTP on the node (timedatectl set-ntp true)",
            )
        )
    dups = duplicate_ids(members)
    for node_id, same in dups.items():
        names = ", ".join(f"{m.name} ({m.address})" for m in same)
        checks.append(
            Check(
                "duplicate id",
                False,
                f"{names} all announce node id {node_id}",
                "delete node_id in the --state-dir of all but one and restart them",
            )
        )
    if members and not dups:
        checks.append(Check("duplicate id", True, f"{len(members)} node(s), all ids distinct"))
    return checks


async def run_checks(opts: PlacementOptions) -> list[Check]:
    """Every check, in report order (`opts`: where mDNS runs, the cluster, how long to listen, --peers)."""
    interfaces = list(opts.mdns_interfaces)
    checks = [await multicast_self_test(interfaces or ["127.0.0.1"])]
    discovery = ZeroconfDiscovery(interfaces, opts.cluster, watch_interval=0)
    try:
        members = await discovery.browse(opts.timeout)
        ignored = len(discovery.ignored)
        strangers = len(getattr(discovery, "strangers", ()))
    finally:
        await discovery.close()
    where = ", ".join(interfaces) or "all interfaces"
    other = f"; {ignored} of other clusters" if ignored else ""
    if strangers:  # adverts without a valid membership proof: other keys, --insecure nodes, impostors
        other += f"; {strangers} without this cluster key's proof (ignored)"
    checks.append(
        Check(
            "discovery",
            bool(members) or bool(opts.peers),
            f"{len(members)} node(s) of cluster {opts.cluster!r} on {where}{other}",
            "" if members else "start `edgeshard node` on each board with the same --cluster",
        )
    )
    if opts.peers:
        from edgeshard.coordinator.discovery.members import parse_peers

        members += await StaticDiscovery(parse_peers(opts.peers), opts.cluster).browse()
    from edgeshard.coordinator.discovery.members import distinct

    return checks + member_checks(distinct(members))  # a node in --peers that mDNS also found: once


def print_report(checks: list[Check]) -> None:
    """The checks as coloured lines."""
    from rich.console import Console

    console = Console()
    for c in checks:
        mark = "[yellow]![/]" if c.warning else "[green]ok[/]" if c.ok else "[red]FAIL[/]"
        show_fix = c.fix and (not c.ok or c.warning)
        console.print(f"{mark:>4} {c.name:<22} {c.detail}" + (f"\n       fix: {c.fix}" if show_fix else ""))
    failed = sum(not c.ok for c in checks)
    console.print(
        f"doctor: {failed} of {len(checks)} checks failed"
        if failed
        else f"doctor: all {len(checks)} checks ok"
    )
