"""mDNS adverts need a membership proof: impostors on 127.0.0.1 (no proof, another key, altered, replayed) are
ignored before anything dials them; a member's advert is accepted; a correctly signed advert is dialled (the
control that shows the listener would have noticed). mDNS runs on 127.0.0.1 only, under a fresh cluster name."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid

import pytest
from zeroconf.asyncio import AsyncServiceInfo

from edgeshard.coordinator.discovery.mdns import ZeroconfDiscovery
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.presence.advertise import SERVICE_TYPE, Advert, make_zeroconf
from edgeshard.node.security.advert_proof import sign_txt
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
    impostors = {
        f"noproof-{tag}": txt,
        f"otherkey-{tag}": sign_txt(txt, trap.port, other),
        f"altered-{tag}": {**sign_txt(txt, trap.port, key), "mem_total": str(1 << 40)},
        f"replayed-{tag}": sign_txt(txt, trap.port, key, now=time.time() - 3600),
    }
    caplog.set_level(logging.WARNING, logger="edgeshard.coordinator")

    async def scenario(node: AdvertisedNode):
        azc = make_zeroconf(["127.0.0.1"])
        infos = [_info(label, props, trap.port) for label, props in impostors.items()]
        infos.append(_info(f"signed-{tag}", sign_txt(txt, control.port, key), control.port))
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
    assert "forged or altered" in reasons[f"altered-{tag}"]
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
