"""Finding nodes: the `Discovery` seam and its mDNS implementation, a live membership table.

`ZeroconfDiscovery` browses `_edgeshard._tcp.local.` on the chosen interfaces, confirms every announced node
over gRPC GetInfo (coordinator/discovery/members.py: TXT is only a hint), and keeps a table that changes by events:
`join` (first confirmed), `update` (its record or info changed), `leave` (mDNS goodbye, or two failed health
checks in a row for a node that vanished without one). `StaticDiscovery` (--peers) is the manual fallback.

With a cluster key, nothing a stranger sends on mDNS removes a verified member (issue #20): an advert without
a valid proof for that instance name, port and address (node/security/advert_proof.py), or older than one already
accepted, is a stranger's and leaves the table alone; a goodbye (which cannot be signed) only makes the
coordinator check the member, which leaves when it stops answering - at once when it really stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from edgeshard.coordinator.discovery.members import (
    CONFIRM_TIMEOUT_S,
    EventHub,
    Member,
    MembershipEvent,
    StaticDiscovery,
    confirm,
    duplicate_ids,
    is_healthy,
    member_changed,
)
from edgeshard.node.presence.advertise import SERVICE_TYPE, Advert, make_zeroconf
from edgeshard.node.security.advert_proof import proof_time, signed_addresses, verify_any
from edgeshard.node.security.channels import Insecure, Security, trust
from edgeshard.node.security.channels import current as current_security

__all__ = [
    "Discovery",
    "Member",
    "MembershipEvent",
    "StaticDiscovery",
    "ZeroconfDiscovery",
    "confirm",
    "duplicate_ids",
    "pick_address",
]

log = logging.getLogger("edgeshard.coordinator")

WATCH_INTERVAL_S = 5.0
MAX_STRANGERS = 1024  # strangers remembered (and logged); beyond that they are still ignored, silently
GOODBYE_CHECK_S = 5.0  # after a goodbye, a member that keeps answering this long stays (a stranger's goodbye)


class Discovery(Protocol):
    """Where nodes come from: browse once for a snapshot, or follow membership events."""

    async def browse(self, timeout: float) -> list[Member]: ...

    def events(self) -> AsyncIterator[MembershipEvent]: ...

    async def close(self) -> None: ...


def pick_address(addresses: Sequence[str], interfaces: Sequence[str]) -> str | None:
    """The first of a node's addresses on the network of one of our `interfaces` (any when none match)."""
    if not addresses:
        return None
    if interfaces:
        import psutil

        nets = []
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET and a.address in interfaces and a.netmask:
                    nets.append(ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False))
        for candidate in addresses:
            if any(ipaddress.ip_address(candidate) in net for net in nets):
                return candidate
    return addresses[0]


class ZeroconfDiscovery:
    """Browses `_edgeshard._tcp.local.` on `interfaces` (empty: all) and keeps the membership table.

    Only nodes announcing `cluster` are considered (None: every cluster); others are kept in `ignored`.
    With a cluster key (`security`; None: this process's), adverts without a valid membership proof
    (node/security/advert_proof.py) are strangers: kept in `strangers`, logged once each, and never dialled.
    """

    def __init__(
        self,
        interfaces: Sequence[str] = (),
        cluster: str | None = "default",
        watch_interval: float = WATCH_INTERVAL_S,
        security: Security | None = None,
    ) -> None:
        self.security = security
        self.strangers: dict[str, str] = {}  # instance name -> why its advert is not a member's
        self.interfaces = list(interfaces)
        self.cluster = cluster
        self.watch_interval = watch_interval
        self.table: dict[str, Member] = {}  # instance name -> member
        self.ignored: dict[str, Advert] = {}  # other clusters
        self.pending: set[asyncio.Task] = set()
        self._events = EventHub()
        self.azc = None
        self.browser: AsyncServiceBrowser | None = None
        self.watcher: asyncio.Task | None = None
        self.misses: dict[str, int] = {}
        self.proof_ts: dict[str, int] = {}  # instance name -> timestamp of the newest proof accepted
        self.ignored_goodbyes = 0  # goodbyes for members that went on answering
        self.trust = None  # CA certificates + revocation list, for enrolled nodes' adverts (#20)

    async def start(self) -> None:
        """Open the mDNS sockets and start browsing (idempotent)."""
        if self.azc is not None:
            return
        if self.security is None:
            self.security = current_security()  # ClusterKeyError now, not in a browse callback later
        self.azc = make_zeroconf(self.interfaces)
        self.browser = AsyncServiceBrowser(self.azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        if self.watch_interval:
            self.watcher = asyncio.create_task(self._watch())

    def members(self) -> list[Member]:
        """The table now, sorted by name."""
        return sorted(self.table.values(), key=lambda m: (m.name, m.key))

    async def browse(self, timeout: float) -> list[Member]:
        """Browse for `timeout` seconds, let pending confirmations finish, and return the table."""
        await self.start()
        await asyncio.sleep(timeout)
        while self.pending:
            await asyncio.wait(set(self.pending), timeout=CONFIRM_TIMEOUT_S + 1)
        return self.members()

    def events(self) -> AsyncIterator[MembershipEvent]:
        """Membership changes from now on (join, update, leave)."""
        return self._events.follow()

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self.ignored.pop(name, None)
            self.strangers.pop(name, None)
            if not isinstance(self.security, Insecure) and name in self.table:
                task = asyncio.ensure_future(self._goodbye(name))  # anyone can send one: check first
            else:
                member = self.table.pop(name, None)
                if member is not None:
                    self._events.emit("leave", member)
                return
        else:
            task = asyncio.ensure_future(self._resolve(name))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _resolve(self, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self.azc.zeroconf, 3000):
            log.info("mDNS: %s announced but could not be resolved", name)
            return
        addresses = info.parsed_addresses()
        if not isinstance(self.security, Insecure):  # before anything is dialled: strangers cost nothing
            if self.trust is None:  # enrolled nodes' adverts: their certificate, minus the revoked (#20)
                self.trust = trust(self.security)
            why = verify_any(
                info.properties,
                info.port or 0,
                self.security,
                name=name,
                addresses=addresses,
                trust=self.trust,
            )
            ts = proof_time(info.properties)
            if why is None and ts < self.proof_ts.get(name, 0):
                why = "older than an advert already accepted for this name (a replay)"
            if why is not None:
                if self.strangers.get(name) != why and len(self.strangers) < MAX_STRANGERS:
                    kept = " (the member of that name stays)" if name in self.table else ""
                    shown = ", ".join(addresses) or "?"
                    log.warning("mDNS: ignoring %s (%s:%s): %s%s", name, shown, info.port, why, kept)
                    self.strangers[name] = why
                # a verified member is never removed by an advert: a stranger can send any advert, and a
                # member that really changed keys stops answering our health checks and leaves that way
                return
            self.strangers.pop(name, None)
            self.proof_ts[name] = max(ts, self.proof_ts.get(name, 0))
            signed = set(signed_addresses(info.properties))
            addresses = [a for a in addresses if a in signed]  # dial only what the member signed
        advert = Advert.from_txt(info.properties, info.port or 0, addresses, name)
        if self.cluster is not None and advert.cluster != self.cluster:
            self.ignored[name] = advert
            return
        host = pick_address(advert.addresses, self.interfaces)
        if host is None or not advert.port:
            return
        member = await confirm(
            f"{host}:{advert.port}", name, "mdns", advert, self.cluster, security=self.security
        )
        if member.status == "ok" and advert.protocol and advert.protocol != member.protocol:
            member = dataclasses.replace(
                member,
                status="version",
                problem="its mDNS record and GetInfo disagree on the protocol version; restart the node",
            )
        self._store(name, member)

    async def _goodbye(self, name: str) -> None:
        """A goodbye for a member: it leaves as soon as it stops answering; if it answers throughout
        GOODBYE_CHECK_S, the goodbye was not its own and it stays."""
        member = self.table.get(name)
        if member is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GOODBYE_CHECK_S
        while await is_healthy(member.address, timeout=1.0, security=self.security):
            if loop.time() >= deadline:
                self.ignored_goodbyes += 1
                log.warning(
                    "mDNS: a goodbye for %s (%s), but it still answers: ignored (not its own goodbye?)",
                    name,
                    member.address,
                )
                return
            await asyncio.sleep(0.5)
        if self.table.get(name) is member:
            del self.table[name]
            self.misses.pop(name, None)
            self._events.emit("leave", member)

    def _store(self, key: str, member: Member) -> None:
        old = self.table.get(key)
        self.table[key] = member
        self.misses.pop(key, None)
        if old is None:
            self._events.emit("join", member)
        elif member_changed(old, member):
            self._events.emit("update", member)

    async def _watch(self) -> None:
        """Health-check confirmed members; two misses in a row make a node leave (it died without goodbye)."""
        while True:
            await asyncio.sleep(self.watch_interval)
            for key, member in list(self.table.items()):
                alive = await is_healthy(member.address, security=self.security)
                if alive:
                    self.misses.pop(key, None)
                    continue
                self.misses[key] = self.misses.get(key, 0) + 1
                if self.misses[key] >= 2 and self.table.pop(key, None) is not None:
                    self._events.emit(
                        "leave",
                        dataclasses.replace(
                            member, status="unreachable", problem="stopped answering health checks"
                        ),
                    )

    async def close(self) -> None:
        """Stop browsing and close the sockets."""
        if self.watcher is not None:
            self.watcher.cancel()
        for task in list(self.pending):
            task.cancel()
        if self.azc is not None:
            with contextlib.suppress(Exception):
                await self.browser.async_cancel()
            await self.azc.async_close()
            self.azc = None
