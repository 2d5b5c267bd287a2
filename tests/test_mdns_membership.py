"""mDNS adverts need a membership proof: impostors on 127.0.0.1 (no proof, another key, altered, replayed) are
ignored before anything dials them; a member's advert is accepted; a correctly signed advert is dialled (the
control that shows the listener would have noticed). mDNS runs on 127.0.0.1 only, under a fresh cluster name."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid

import pytest
from zeroconf import DNSOutgoing, DNSPointer, const
from zeroconf.asyncio import AsyncServiceInfo

from edgeshard.coordinator.discovery.mdns import ZeroconfDiscovery
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.presence.advertise import SERVICE_TYPE, Advert, make_zeroconf
from edgeshard.node.security.advert_proof import sign_txt, verify_txt
from edgeshard.node.security.cluster_key import ClusterKey

pytestmark = pytest.mark.slow


class AdvertisedNode(LocalNodes):
    """One node process announcing itself on mDNS, 127.0.0.1 only, in `cluster`."""

    def __init__(self, cluster: str, key: ClusterKey) -> None:
        super().__init__(1, threads=1, name=f"mem-{cluster[-4:]}-", security=key)
        self.cluster = cluster

    def command(self, i: int) -> list[str]:
        cmd = [a for a in super().command(i) if a != "--no-advertise"]
        return cmd + ["--mdns-interface", "127.0.0.1", "--cluster", self.cluster, "--no-benchmark"]


class Listener:
    """A TCP port on 127.0.0.1 that counts the connections made to it (and answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _info(label: str, props: dict[str, str], port: int) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=port,
        properties=props,
        addresses=[socket.inet_aton("127.0.0.1")],
        server=f"{label}.local.",
    )


def test_impostor_adverts_are_ignored_before_dialling(caplog):
    key, other = ClusterKey.generate(), ClusterKey.generate()
    cluster = f"sec-{uuid.uuid4().hex[:10]}"
    trap, control = Listener(), Listener()
    tag = uuid.uuid4().hex[:6]
    txt = Advert(
        node_id=uuid.uuid4().hex, name="impostor", port=trap.port, protocol=1, cluster=cluster
    ).to_txt()

    def signed(label: str, port: int, k: ClusterKey = key, **kw) -> dict[str, str]:
        return sign_txt(txt, port, k, name=f"{label}.{SERVICE_TYPE}", addresses=["127.0.0.1"], **kw)

    impostors = {
        f"noproof-{tag}": txt,
        f"otherkey-{tag}": signed(f"otherkey-{tag}", trap.port, other),
        f"altered-{tag}": {**signed(f"altered-{tag}", trap.port), "mem_total": str(1 << 40)},
        f"replayed-{tag}": signed(f"replayed-{tag}", trap.port, now=time.time() - 3600),
        f"renamed-{tag}": signed(f"signed-{tag}", trap.port),  # a member's advert under another name
    }
    caplog.set_level(logging.WARNING, logger="edgeshard.coordinator")

    async def scenario(node: AdvertisedNode):
        azc = make_zeroconf(["127.0.0.1"])
        infos = [_info(label, props, trap.port) for label, props in impostors.items()]
        infos.append(_info(f"signed-{tag}", signed(f"signed-{tag}", control.port), control.port))
        try:
            await asyncio.gather(*[await azc.async_register_service(i) for i in infos])
            discovery = ZeroconfDiscovery(["127.0.0.1"], cluster, watch_interval=0, security=key)
            try:
                members = await discovery.browse(6.0)
                return members, dict(discovery.strangers)
            finally:
                await discovery.close()
        finally:
            await azc.async_unregister_all_services()
            await azc.async_close()

    try:
        with AdvertisedNode(cluster, key) as node:
            members, strangers = asyncio.run(scenario(node))
    finally:
        trap.close()
        control.close()
    by_address = {m.address: m for m in members}
    assert by_address[node.addresses[0]].ok, members  # the member's advert is accepted and confirmed
    assert f"127.0.0.1:{control.port}" in by_address and control.accepted >= 1  # signed: dialled
    assert trap.accepted == 0, "an impostor's advert was dialled"
    assert sorted(n.split(".")[0] for n in strangers) == sorted(impostors)
    reasons = {n.split(".")[0]: why for n, why in strangers.items()}
    assert "no membership proof" in reasons[f"noproof-{tag}"]
    assert "another cluster key" in reasons[f"otherkey-{tag}"]
    assert "forged, altered" in reasons[f"altered-{tag}"]
    assert "re-announced" in reasons[f"renamed-{tag}"]
    assert "s old" in reasons[f"replayed-{tag}"]
    logged = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    for label in impostors:  # logged once per stranger
        assert sum(label in line for line in logged) == 1, logged


def test_a_node_seen_by_mdns_and_in_peers_is_not_a_duplicate_id():
    from edgeshard.coordinator.discovery.members import Member, distinct, duplicate_ids

    via_mdns = Member("n1._edgeshard._tcp.local.", "n1", "127.0.0.1:50051", "mdns", "ok", node_id="abc")
    via_peers = Member("localhost:50051", "n1", "localhost:50051", "peers", "ok", node_id="abc")
    clone = Member("n2._edgeshard._tcp.local.", "n2", "127.0.0.1:50052", "mdns", "ok", node_id="abc")
    assert duplicate_ids([via_mdns, via_peers]) == {} and distinct([via_mdns, via_peers]) == [via_mdns]
    assert [m.name for m in duplicate_ids([via_mdns, via_peers, clone])["abc"]] == ["n1", "n2"]


# ------------------------------------------------------------------- members cannot be evicted by strangers
def _announce(azc, info: AsyncServiceInfo, ttl: int | None = None) -> None:
    """Send `info`'s records as an mDNS response (cache-flush set, as a responder does): what anyone on the
    LAN can put on the air for any name, without registering (no probing, no conflict check)."""
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    records = [info.dns_pointer(ttl), info.dns_service(ttl), info.dns_text(ttl), *info.dns_addresses(ttl)]
    for record in records:
        out.add_answer_at_time(record, 0)
    azc.zeroconf.async_send(out)


def _goodbye(azc, name: str) -> None:
    """A goodbye for `name` (its PTR record with TTL 0), as a stranger sends it."""
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    out.add_answer_at_time(DNSPointer(SERVICE_TYPE, const._TYPE_PTR, const._CLASS_IN, 0, name), 0)
    azc.zeroconf.async_send(out)


def test_strangers_cannot_evict_a_verified_member(caplog):
    """An unauthenticated goodbye, an unsigned advert and a member's own advert replayed at another port,
    all for the member's instance name: the member stays in the table (no leave event) and nothing the
    stranger named is dialled; when the node really stops, it leaves."""
    key = ClusterKey.generate()
    cluster = f"evict-{uuid.uuid4().hex[:10]}"
    trap = Listener()
    caplog.set_level(logging.WARNING, logger="edgeshard.coordinator")

    async def scenario(node: AdvertisedNode):
        # health checks every second: after a forged goodbye browsers forget the name, so the node's own
        # goodbye later is no news to them; the watcher sees it stop answering
        discovery = ZeroconfDiscovery(["127.0.0.1"], cluster, watch_interval=1.0, security=key)
        azc = make_zeroconf(["127.0.0.1"])
        events = discovery.events()
        seen: list = []
        try:
            await discovery.start()
            join = await asyncio.wait_for(anext(events), 60)
            assert join.kind == "join" and join.member.ok, join
            (name,) = discovery.table
            real = AsyncServiceInfo(SERVICE_TYPE, name)
            assert await real.async_request(azc.zeroconf, 3000)
            props = {k.decode(): (v or b"").decode() for k, v in real.properties.items()}
            server = f"evil-{uuid.uuid4().hex[:6]}.local."
            unsigned = {k: v for k, v in props.items() if k not in ("mac", "ts", "kid", "pv", "addrs")}
            # (each advert follows a goodbye, so browsers see it as new and resolve it)
            attacks = [
                ("goodbye", None),
                ("replayed elsewhere", _info_named(name, props, trap.port, server)),
                ("goodbye", None),
                ("unsigned", _info_named(name, unsigned, trap.port, server)),
            ]
            for what, info in attacks:
                await asyncio.sleep(1.5)  # past the cache-flush grace of the member's own records
                if info is None:
                    _goodbye(azc, name)
                else:
                    _announce(azc, info)
                await asyncio.sleep(2.0)
                while discovery.pending:
                    await asyncio.wait(set(discovery.pending), timeout=15)
                assert name in discovery.table and discovery.table[name].ok, (what, discovery.table)
            with contextlib.suppress(TimeoutError):
                while True:
                    seen.append(await asyncio.wait_for(anext(events), 0.5))
            assert not [e for e in seen if e.kind == "leave"], seen
            ignored_goodbyes, strangers = discovery.ignored_goodbyes, dict(discovery.strangers)
            # the node really stops: its own goodbye, then it stops answering -> it leaves
            await asyncio.to_thread(node.procs[0].terminate)
            while (await asyncio.wait_for(anext(events), 30)).kind != "leave":
                pass
            return name, ignored_goodbyes, strangers
        finally:
            await events.aclose()
            await discovery.close()
            await azc.async_close()

    try:
        with AdvertisedNode(cluster, key) as node:
            name, ignored_goodbyes, strangers = asyncio.run(scenario(node))
    finally:
        trap.close()
    assert trap.accepted == 0, "a stranger's address was dialled"
    assert ignored_goodbyes == 2
    logged = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert sum("still answers" in line for line in logged) == 2, logged
    stays = [line for line in logged if "the member of that name stays" in line]
    assert any(f":{trap.port}): invalid membership proof" in line for line in stays), logged  # replayed
    assert any(f":{trap.port}): no membership proof" in line for line in stays), logged  # unsigned


def _info_named(name: str, props: dict[str, str], port: int, server: str) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        name,
        port=port,
        properties=props,
        addresses=[socket.inet_aton("127.0.0.1")],
        server=server,
    )


def test_the_proof_covers_name_port_and_addresses():
    key = ClusterKey.generate()
    txt = Advert(node_id="n1", name="pi", port=50051, cluster="c").to_txt()
    name = f"pi-n1.{SERVICE_TYPE}"
    signed = sign_txt(txt, 50051, key, name=name, addresses=["192.0.2.10"])
    assert verify_txt(signed, 50051, key, name=name, addresses=["192.0.2.10"]) is None
    assert verify_txt(signed, 50051, key, name=name.upper(), addresses=["192.0.2.10", "192.0.2.99"]) is None
    assert "re-announced" in verify_txt(signed, 50051, key, name=f"evil-n1.{SERVICE_TYPE}")
    assert "re-announced" in verify_txt(signed, 50052, key, name=name)
    assert "re-addressed" in verify_txt(signed, 50051, key, name=name, addresses=["192.0.2.66"])
    moved = {**signed, "addrs": "192.0.2.66"}
    assert "re-announced" in verify_txt(moved, 50051, key, name=name, addresses=["192.0.2.66"])
    v1 = {k: v for k, v in signed.items() if k != "pv"}
    assert "older edgeshard" in verify_txt(v1, 50051, key, name=name)
