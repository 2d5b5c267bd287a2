"""mDNS (DNS-SD) advertising of a node: `_edgeshard._tcp.local.` with what the node offers in TXT records.

    <name>-<id8>._edgeshard._tcp.local.   SRV -> es-<id8>.local.:<grpc port>, A -> the node's addresses
    TXT  id=<node id> v=<protocol> cluster=<name> mem_free=<bytes> mem_total=<bytes> mem_limit=<bytes>
         cores=<n> threads=<n> arch=<machine> gbps=<int4 GB/s> lms=<layer overhead ms> loaded=<a-b of n|>
         ver=<package version> name=<node name>
         addrs=<addresses> ts=<unix s> kid=<key id> pv=2 mac=<HMAC>   membership proof over the instance name,
         port, addresses and TXT, with a cluster key (advert_proof.py)

TXT is a hint for humans and for filtering (cluster, protocol); a coordinator confirms every node over gRPC
GetInfo before it plans with it. The record is refreshed when it changes (free memory after a shard loads,
the loaded range) and withdrawn (mDNS goodbye) when the node stops, so browsers see the node leave at once.

Interfaces: `--mdns-interface IP` (repeatable) picks where mDNS runs; without it a node on a LAN uses all
interfaces. `make_zeroconf` also turns off Linux's IP_MULTICAST_ALL on the sockets, so an instance bound to
chosen interfaces hears only the groups it joined there (without it, a socket on 0.0.0.0:5353 receives mDNS
from every interface any process joined, and zeroconf would answer unicast queries from those too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edgeshard.node.security.advert_proof import RESIGN_S

log = logging.getLogger("edgeshard.node")

SERVICE_TYPE = "_edgeshard._tcp.local."
REFRESH_S = 2.0  # how often a node looks whether its record changed
_MEM_STEP = 32 << 20  # free memory moves all the time: re-announce only changes above 32 MiB (or 5%)
_IP_MULTICAST_ALL = 49  # <linux/in.h>; Python's socket module does not name it


@dataclass(frozen=True)
class Advert:
    """What a node announces (its TXT record plus SRV port and A addresses), as a value."""

    node_id: str
    name: str
    port: int
    addresses: tuple[str, ...] = ()
    protocol: int = 0
    cluster: str = "default"
    memory_free: int = 0
    memory_total: int = 0
    memory_limit: int = 0
    cores: int = 0
    threads: int = 0
    arch: str = ""
    int4_gbps: float = 0.0  # measured weight rate of the int4 kernel (0: not measured)
    layer_overhead_ms: float = 0.0
    loaded: str = ""  # "start-end/num_layers" of the loaded shard, "" when none
    version: str = ""
    instance: str = ""  # the mDNS service name, set by whoever resolved it

    _TXT = {
        "id": "node_id",
        "name": "name",
        "v": "protocol",
        "cluster": "cluster",
        "mem_free": "memory_free",
        "mem_total": "memory_total",
        "mem_limit": "memory_limit",
        "cores": "cores",
        "threads": "threads",
        "arch": "arch",
        "gbps": "int4_gbps",
        "lms": "layer_overhead_ms",
        "loaded": "loaded",
        "ver": "version",
    }

    def to_txt(self) -> dict[str, str]:
        """The TXT properties (short keys: a TXT string holds at most 255 bytes)."""
        return {key: str(getattr(self, attr)) for key, attr in self._TXT.items()}

    @classmethod
    def from_txt(cls, props: dict, port: int, addresses: Sequence[str], instance: str = "") -> Advert:
        """Parse TXT properties (bytes or str keys/values); unknown keys are ignored, bad numbers become 0."""
        text = {_s(k): _s(v) for k, v in props.items() if k is not None}
        kwargs: dict = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, attr in cls._TXT.items():
            if key not in text:
                continue
            kind = types[attr]
            try:
                kwargs[attr] = (
                    int(text[key]) if kind == "int" else float(text[key]) if kind == "float" else text[key]
                )
            except ValueError:
                kwargs[attr] = 0
        kwargs.setdefault("node_id", "")
        kwargs.setdefault("name", instance.split(".")[0])
        return cls(port=port, addresses=tuple(addresses), instance=instance, **kwargs)

    def differs_from(self, other: Advert) -> bool:
        """Worth re-announcing: anything but free memory changed, or free memory moved by > 32 MiB / 5%."""
        if dataclasses.replace(self, memory_free=0) != dataclasses.replace(other, memory_free=0):
            return True
        delta = abs(self.memory_free - other.memory_free)
        return delta > max(_MEM_STEP, 0.05 * max(self.memory_free, 1))


def _s(x: bytes | str | None) -> str:
    return "" if x is None else x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def package_version() -> str:
    """The installed edgeshard version (reported in TXT and GetInfo, so doctor can spot version skew)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeshard")
    except PackageNotFoundError:
        return "0+unknown"


def local_ipv4_addresses() -> list[str]:
    """Every IPv4 address of this machine's interfaces (loopback included)."""
    import psutil

    return [
        a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET
    ]


def interface_address(text: str) -> str:
    """An `--mdns-interface` value, checked: an IPv4 address one of this machine's interfaces has.

    Checked when the flags are read, so a foreign address is one error line before anything starts (zeroconf
    would otherwise fail deep inside its multicast set-up, after the node said it was ready).
    """
    import argparse

    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None
    if addr.version != 4:
        raise argparse.ArgumentTypeError(f"{text}: only IPv4 interface addresses are supported")
    mine = local_ipv4_addresses()
    if mine and str(addr) not in mine:
        raise argparse.ArgumentTypeError(
            f"{addr} is not an address of this machine (its IPv4 addresses: {', '.join(mine)}); "
            "give the address of the interface mDNS should run on"
        )
    return str(addr)


def make_zeroconf(interfaces: Sequence[str] = ()) -> AsyncZeroconf:
    """An AsyncZeroconf on `interfaces` (IPv4 addresses; empty: all interfaces), hardened as the module says."""
    if interfaces:
        for ip in interfaces:
            addr = ipaddress.ip_address(ip)  # ValueError names the bad one
            if addr.version != 4:
                raise ValueError(f"--mdns-interface {ip}: only IPv4 interface addresses are supported")
        azc = AsyncZeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
    else:
        azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    engine = azc.zeroconf.engine
    for sock in [getattr(engine, "_listen_socket", None), *getattr(engine, "_respond_sockets", [])]:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
    return azc


def advertised_addresses(host: str, interfaces: Sequence[str]) -> list[str]:
    """Where the node can be reached: its --host if specific, else the mDNS interfaces, else every IPv4
    address of the machine (loopback only when there is nothing else)."""
    if host not in ("", "0.0.0.0", "::", "[::]"):
        return [host]
    if interfaces:
        return list(interfaces)
    import psutil

    found = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    return found or ["127.0.0.1"]


def instance_name(name: str, node_id: str) -> str:
    """`<name>-<id8>._edgeshard._tcp.local.`: the id suffix keeps two boards called `pi` apart."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:40] or "node"
    return f"{label}-{node_id[:8]}.{SERVICE_TYPE}"


class Advertiser:
    """Keeps a node's record on mDNS: register, refresh from `snapshot()` while it changes, withdraw.

    Also browses its own service type to spot another node announcing the same id (`duplicates`).
    """

    def __init__(
        self,
        snapshot: Callable[[], Advert],
        interfaces: Sequence[str] = (),
        sign: Callable[[dict[str, str], int, str, Sequence[str]], dict[str, str]] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.interfaces = list(interfaces)
        # adds the membership proof (props, port, instance name, addresses) to the TXT (node/security/advert_proof.py)
        self.sign = sign
        self.signed_at = 0.0  # monotonic time of the last proof: it is renewed every RESIGN_S
        self.azc: AsyncZeroconf | None = None
        self.info: AsyncServiceInfo | None = None
        self.current: Advert | None = None
        self.duplicates: set[str] = set()  # instance names of other nodes with our id
        self.browser: AsyncServiceBrowser | None = None
        self.task: asyncio.Task | None = None

    def _service_info(self, advert: Advert, name: str) -> AsyncServiceInfo:
        props = advert.to_txt()
        if self.sign is not None:
            props = self.sign(props, advert.port, name, advert.addresses)
            self.signed_at = time.monotonic()
        return AsyncServiceInfo(
            SERVICE_TYPE,
            name,
            port=advert.port,
            properties=props,
            addresses=[socket.inet_aton(a) for a in advert.addresses],
            server=f"es-{advert.node_id[:8]}.local.",
        )

    async def start(self) -> None:
        """Register (in the background: mDNS probing takes about a second) and start the refresh loop."""
        self.azc = make_zeroconf(self.interfaces)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        advert = self.snapshot()
        name = instance_name(advert.name, advert.node_id)
        self.info = self._service_info(advert, name)
        try:
            await self.azc.async_register_service(self.info)
        except NonUniqueNameException:
            # Someone answers for our exact name: another live node with our id (and name) - a clone.
            log.warning(
                "another node on the LAN announces %s with this node's id %s; give one of them a new "
                "id by deleting node_id in its --state-dir. Registering under a changed name.",
                name,
                advert.node_id,
            )
            self.duplicates.add(name)
            await self.azc.async_register_service(self.info, allow_name_change=True)
            if self.sign is not None and self.info.name != name:  # the proof covers the name: re-sign
                self.info = self._service_info(advert, self.info.name)
                await self.azc.async_update_service(self.info)
        self.current = advert
        self.browser = AsyncServiceBrowser(self.azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        log.info(
            "advertising %s on mDNS (%s)", self.info.name, ", ".join(self.interfaces) or "all interfaces"
        )
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    async def refresh(self) -> bool:
        """Re-announce if the record changed enough; True when it did."""
        if self.info is None or self.current is None:
            return False
        advert = self.snapshot()
        stale = self.sign is not None and time.monotonic() - self.signed_at > RESIGN_S  # renew the proof
        if not advert.differs_from(self.current) and not stale:
            return False
        self.info = self._service_info(advert, self.info.name)
        await self.azc.async_update_service(self.info)
        self.current = advert
        return True

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if (
            state_change is not ServiceStateChange.Removed
            and self.info is not None
            and name != self.info.name
        ):
            asyncio.ensure_future(self._check_duplicate(name))

    async def _check_duplicate(self, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self.azc.zeroconf, 2000):
            return
        other = Advert.from_txt(info.properties, info.port or 0, info.parsed_addresses(), name)
        if self.current and other.node_id == self.current.node_id and name not in self.duplicates:
            self.duplicates.add(name)
            log.warning(
                "duplicate node id %s: %s (%s) announces it too; delete node_id in the --state-dir of "
                "one of them (a cloned SD card copies it)",
                other.node_id,
                name,
                ", ".join(f"{a}:{other.port}" for a in other.addresses),
            )

    async def close(self) -> None:
        """Withdraw the record (mDNS goodbye) and close the sockets."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.azc is None:
            return
        with contextlib.suppress(Exception):
            if self.browser is not None:
                await self.browser.async_cancel()
            if self.current is not None:
                await self.azc.async_unregister_service(self.info)
        await self.azc.async_close()
        self.azc = None


def node_advert(servicer, port: int, host: str, interfaces: Sequence[str]) -> Advert:
    """The Advert of a running node, read from its servicer (node/service/server.py) and its capability now."""
    from edgeshard.node.presence.capability import memory_snapshot
    from edgeshard.node.wire import PROTOCOL_VERSION

    cap = servicer.capability
    total, free = memory_snapshot()
    shard = servicer.node.shard
    loaded = f"{shard.spec.start_layer}-{shard.spec.end_layer}/{shard.spec.num_layers}" if shard else ""
    return Advert(
        node_id=servicer.node_id,
        name=servicer.node.name,
        port=port,
        addresses=tuple(advertised_addresses(host, interfaces)),
        protocol=PROTOCOL_VERSION,
        cluster=servicer.options.cluster,
        memory_free=free,
        memory_total=total,
        memory_limit=cap.memory_limit,
        cores=cap.cores,
        threads=cap.threads,
        arch=cap.arch,
        int4_gbps=round(cap.int4_gbps, 1),  # coarse: re-measurements should not re-announce the node
        layer_overhead_ms=round(cap.layer_overhead_ms, 2),
        loaded=loaded,
        version=package_version(),
    )


async def start_advertising(servicer, port: int) -> Advertiser:
    """Advertise the node that `servicer` serves on `port` (the hook node/service/server.py calls once listening)."""
    from edgeshard.node.security.advert_proof import sign_txt
    from edgeshard.node.security.cluster_key import ClusterKey
    from edgeshard.node.security.credentials import NodeCredentials

    opts = servicer.options
    # a key holder signs with the cluster's mDNS key, an enrolled node with its own key and certificate
    key = opts.security if isinstance(opts.security, ClusterKey | NodeCredentials) else None
    adv = Advertiser(
        lambda: node_advert(servicer, port, opts.host, opts.mdns_interfaces),
        opts.mdns_interfaces,
        sign=(
            (lambda props, p, name, addrs: sign_txt(props, p, key, name=name, addresses=addrs))
            if key is not None
            else None
        ),
    )
    await adv.start()
    return adv
