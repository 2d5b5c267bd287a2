"""Members of a cluster as the coordinator sees them: confirmed over gRPC GetInfo, judged, and followed.

mDNS only hints (TXT may be stale, spoofed or from another version); every node is confirmed over gRPC
GetInfo before it counts, and what GetInfo says wins. A member carries a status:

    ok           confirmed, same protocol, same cluster: usable for plans
    version      speaks another protocol version (reported; never planned with)
    cluster      GetInfo says another cluster than its TXT did (reported)
    unreachable  announced on mDNS but its gRPC port does not answer (firewall, wrong address, crashed)
    untrusted    answers, but not as a member: it holds another (or a stale) cluster key, or runs --insecure
    revoked      answers with a certificate `edgeshard secret revoke` revoked (never planned with)

Membership changes arrive as events: `join` (first confirmed), `update` (its record or info changed),
`leave` (mDNS goodbye, or two failed health checks in a row for a node that vanished without one).

`StaticDiscovery` is the `--peers` fallback: the same members, from addresses the user gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from edgeshard.coordinator.errors import ClusterError
from edgeshard.node.presence.advertise import Advert
from edgeshard.node.presence.capability import Capability, from_wire
from edgeshard.node.security.channels import Insecure, Security, connection_problem, revocations
from edgeshard.node.security.channels import channel as secure_channel
from edgeshard.node.security.channels import current as current_security
from edgeshard.node.security.credentials import Trust, ca_certificates
from edgeshard.node.wire import PROTOCOL_VERSION
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.options import GRPC_OPTIONS

CONFIRM_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Member:
    """A node the coordinator knows of, with what it confirmed over GetInfo."""

    key: str  # unique: the mDNS instance name, or the address for --peers
    name: str
    address: str  # host:port for gRPC
    source: str  # "mdns" or "peers"
    status: str  # ok, version, cluster, unreachable (see the module docstring)
    problem: str = ""  # what is wrong and what to do ("" when ok)
    node_id: str = ""
    advert: Advert | None = None  # the TXT hint (mDNS members)
    capability: Capability | None = None  # from GetInfo (None until confirmed)
    protocol: int = 0
    version: str = ""  # edgeshard package version of the node
    cluster: str = ""
    loaded: str = ""  # "start-end/num_layers" of its shard now, "" when none
    held_bytes: int = 0  # weights + KV it holds now (freed when it loads a new shard)
    clock_offset_s: float = 0.0  # node clock minus ours, corrected by half the round trip
    rtt_ms: float = 0.0  # of the confirming GetInfo (connection set-up included)

    @property
    def ok(self) -> bool:
        """Confirmed and compatible: may be planned with."""
        return self.status == "ok"

    def to_dict(self) -> dict:
        """JSON-friendly dict (`nodes --json`)."""
        d = dataclasses.asdict(self)
        d["advert"] = dataclasses.asdict(self.advert) if self.advert else None
        return d


@dataclass(frozen=True)
class MembershipEvent:
    """A change of the membership table."""

    kind: str  # "join", "update" or "leave"
    member: Member


async def confirm(
    address: str,
    key: str,
    source: str,
    advert: Advert | None = None,
    cluster: str | None = None,
    timeout: float = CONFIRM_TIMEOUT_S,
    security: Security | None = None,
) -> Member:
    """Ask the node at `address` for GetInfo and judge it (`cluster` None accepts any cluster; `security`
    None: this process's cluster key)."""
    name = advert.name if advert else address
    challenge = secrets.token_bytes(16)  # the node signs it: which member's certificate answers (#20)
    try:
        async with secure_channel(address, security, GRPC_OPTIONS) as channel:
            sent = time.time()
            t0 = time.perf_counter()
            stub = pb_grpc.NodeStub(channel)
            info = await stub.GetInfo(pb.GetInfoRequest(creds_challenge=challenge), timeout=timeout)
            rtt = time.perf_counter() - t0
            revoked = await _check_credentials(stub, info, challenge, security, timeout)
    except grpc.aio.AioRpcError as e:
        why = (e.details() or e.code().name).splitlines()[0][:160]
        stranger = connection_problem(e.details())
        if stranger is not None or e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return Member(
                key,
                name,
                address,
                source,
                "untrusted",
                node_id=advert.node_id if advert else "",
                advert=advert,
                problem=f"not a member of this cluster: {stranger or why}",
            )
        return Member(
            key,
            name,
            address,
            source,
            "unreachable",
            node_id=advert.node_id if advert else "",
            advert=advert,
            problem=f"gRPC {address} does not answer ({why}); check the node runs and "
            "that its port is open (firewall), or that it announces the right address",
        )
    held = (info.shard.weight_bytes + info.stats.kv_bytes) if info.loaded else 0
    loaded = f"{info.shard.start_layer}-{info.shard.end_layer}/{info.shard.num_layers}" if info.loaded else ""
    member = Member(
        key,
        info.name or name,
        address,
        source,
        "ok",
        node_id=info.node_id,
        advert=advert,
        capability=from_wire(info.capabilities),
        protocol=info.protocol_version,
        version=info.version,
        cluster=info.cluster,
        loaded=loaded,
        held_bytes=held,
        rtt_ms=round(rtt * 1e3, 3),
        clock_offset_s=round(info.clock_unix_s - (sent + rtt / 2), 4) if info.clock_unix_s else 0.0,
    )
    if revoked is not None:
        return dataclasses.replace(member, status="revoked", problem=revoked)
    if info.protocol_version != PROTOCOL_VERSION:
        return dataclasses.replace(
            member,
            status="version",
            problem=(
                f"speaks protocol v{info.protocol_version} (edgeshard {info.version or '?'}), this coordinator "
                f"v{PROTOCOL_VERSION}: install the same edgeshard version on both"
            ),
        )
    if cluster is not None and info.cluster and info.cluster != cluster:
        return dataclasses.replace(
            member,
            status="cluster",
            problem=(
                f"serves cluster {info.cluster!r}, not {cluster!r}: start it with --cluster {cluster} or pass "
                f"--cluster {info.cluster} here"
            ),
        )
    return member


async def _check_credentials(
    stub: pb_grpc.NodeStub, info: pb.NodeInfo, challenge: bytes, security: Security | None, timeout: float
) -> str | None:
    """Why the node that answered GetInfo is refused (its certificate is revoked or not its own), else None;
    pushes our revocation list when the node holds an older one (how members learn it, #20)."""
    sec = security if security is not None else current_security()
    if isinstance(sec, Insecure):
        return None
    store = revocations(sec)
    why = None
    if info.creds_certificate:  # (an older node sends none: the token check on its side still applies)
        trusted = Trust(ca_certificates(sec), store)
        _, why = trusted.check_challenge(info.creds_certificate, info.creds_signature, challenge)
    if why is None and store is not None and store.current.seq > info.creds_revocation_seq:
        with contextlib.suppress(grpc.aio.AioRpcError):  # (an older node has no such method: it stays as is)
            await stub.PushRevocations(
                pb.CredsRevocations(signed_list=store.current.to_bytes()), timeout=timeout
            )
    return why


async def refuse_revoked(addresses: Sequence[str], security: Security | None = None) -> None:
    """ClusterError naming the first of `addresses` whose node answers with a revoked certificate (#20).

    For paths that dial given addresses without confirming them first (`run --peers`, `serve --peers`):
    free when this process holds no revocation list, one GetInfo per node otherwise."""
    sec = security if security is not None else current_security()
    if isinstance(sec, Insecure):
        return
    store = revocations(sec)
    if store is None or store.current.seq == 0:
        return
    members = await asyncio.gather(*(confirm(a, a, "peers", security=sec) for a in addresses))
    for m in members:
        if m.status == "revoked":
            raise ClusterError(f"node {m.name} at {m.address}: {m.problem}; leave it out of --peers")


def same_node(a: Member, b: Member) -> bool:
    """Two sightings of one node process: the same id at the same address, or the same id and port seen once
    via mDNS and once via --peers (which may name the host differently: a name, another of its addresses)."""
    if not a.node_id or a.node_id != b.node_id:
        return False
    if a.address == b.address:
        return True
    return a.source != b.source and a.address.rsplit(":", 1)[-1] == b.address.rsplit(":", 1)[-1]


def distinct(members: Sequence[Member]) -> list[Member]:
    """`members` with second sightings of one node (`same_node`) dropped; the first is kept."""
    kept: list[Member] = []
    for m in members:
        if not any(same_node(k, m) for k in kept):
            kept.append(m)
    return kept


def duplicate_ids(members: Sequence[Member]) -> dict[str, list[Member]]:
    """Node ids announced by more than one node (a cloned SD card copies the state directory); a node seen
    twice (by mDNS and in --peers) is one node, not a duplicate."""
    by_id: dict[str, list[Member]] = {}
    for m in distinct(members):
        if m.node_id:
            by_id.setdefault(m.node_id, []).append(m)
    return {i: ms for i, ms in by_id.items() if len(ms) > 1}


def member_changed(old: Member, new: Member) -> bool:
    """Worth an update event: anything but the ever-moving measurements (free memory, clock, round trip)."""

    def key(m: Member) -> Member:
        cap = dataclasses.replace(m.capability, memory_free=0) if m.capability else None
        adv = dataclasses.replace(m.advert, memory_free=0) if m.advert else None
        return dataclasses.replace(m, capability=cap, advert=adv, clock_offset_s=0.0, rtt_ms=0.0)

    return key(old) != key(new)


async def is_healthy(address: str, timeout: float = 2.0, security: Security | None = None) -> bool:
    """The node at `address` answers a Health call within `timeout` seconds."""
    try:
        async with secure_channel(address, security, GRPC_OPTIONS) as channel:
            await pb_grpc.NodeStub(channel).Health(pb.HealthRequest(), timeout=timeout)
        return True
    except grpc.aio.AioRpcError:
        return False


class EventHub:
    """Fan-out of membership events to every `events()` iterator."""

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue] = []

    def emit(self, kind: str, member: Member) -> None:
        for q in self.queues:
            q.put_nowait(MembershipEvent(kind, member))

    def follow(self) -> Subscription:
        """The events from now on (subscribed at once, not at the first `anext`); `aclose()` unsubscribes."""
        sub = Subscription(self)
        self.queues.append(sub.queue)
        return sub


class Subscription:
    """An async iterator over one subscriber's queue of membership events."""

    def __init__(self, events: EventHub) -> None:
        self.events, self.queue = events, asyncio.Queue()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> MembershipEvent:
        return await self.queue.get()

    async def aclose(self) -> None:
        """Stop receiving events."""
        if self.queue in self.events.queues:
            self.events.queues.remove(self.queue)


class StaticDiscovery:
    """`--peers`: the given addresses, confirmed over GetInfo, in the given order; no events after."""

    def __init__(self, peers: Sequence[str], cluster: str | None = None) -> None:
        self.peers = list(peers)
        self.cluster = cluster
        self._events = EventHub()

    async def browse(self, timeout: float = CONFIRM_TIMEOUT_S) -> list[Member]:
        """Confirm every peer (at once); members in the given order."""
        members = await asyncio.gather(
            *(confirm(p, p, "peers", None, self.cluster, timeout) for p in self.peers)
        )
        for m in members:
            self._events.emit("join", m)
        return list(members)

    def events(self) -> AsyncIterator[MembershipEvent]:
        """Joins of the next browse; static peers never leave on their own."""
        return self._events.follow()

    async def close(self) -> None:
        """Nothing to release."""


def parse_peers(peers: str) -> list[str]:
    """`a:1,b:2` -> ['a:1', 'b:2'], checking each is host:port."""
    out = [p.strip() for p in peers.split(",") if p.strip()]
    if not out:
        raise ValueError("--peers is empty; give node addresses host:port,host:port in pipeline order")
    for p in out:
        host, _, port = p.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"peer {p!r} is not host:port")
    if len(set(out)) != len(out):
        raise ValueError(f"--peers names a node twice: {peers}")
    return out
