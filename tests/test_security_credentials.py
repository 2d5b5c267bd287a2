"""Per-node credentials and revocation (issue #20): the cluster key enrols a board once; the board then runs
with its own key pair and certificate, and `edgeshard secret revoke NAME` removes it from every member that
learns the signed list while the rest keep serving. Real node processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from edgeshard.coordinator.discovery.members import confirm
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.security import channels
from edgeshard.node.security.call_auth import TokenVerifier, make_token
from edgeshard.node.security.channels import channel
from edgeshard.node.security.cluster_key import ClusterKey, ClusterKeyError
from edgeshard.node.security.credentials import (
    NodeCredentials,
    RevocationList,
    RevocationStore,
    Trust,
    ca_certificates,
    issue,
    signer_for,
)
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc

GET_INFO = "/edgeshard.v1.Node/GetInfo"
FORWARD = "/edgeshard.v1.Node/Forward"


def _verifier(key: ClusterKey, store: RevocationStore | None = None, hmac: bool = False) -> TokenVerifier:
    trust = Trust(ca_certificates(key), store)
    return TokenVerifier(key.auth_key if hmac else None, trust=trust)


def test_an_enrolled_node_holds_its_own_key_and_the_ca_certificate_only(tmp_path):
    key = ClusterKey.generate()
    creds = issue(key, "board1")
    path = creds.save(tmp_path / "board1.creds")
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert key.text not in text and "es1-" not in text  # the cluster key never goes to the board
    again = NodeCredentials.load(path)
    assert again.name == "board1" and again.fingerprint == key.fingerprint
    assert again.tls.ca_pem == key.tls.ca_pem  # the CA's public certificate, nothing more of the CA
    # the CA key derives from the cluster key only: nothing in the bundle signs certificates
    assert text.count("PRIVATE KEY-----") == 2  # one key: BEGIN + END
    assert again.tls.key_pem != key.tls.key_pem  # its own key, not the key holders' shared one


def test_bundles_that_do_not_hold_together_are_refused(tmp_path):
    key, other = ClusterKey.generate(), ClusterKey.generate()
    a, b = issue(key, "a"), issue(other, "b")
    mixed = a.tls.key_pem.decode() + b.tls.cert_pem.decode() + a.tls.ca_pem.decode()
    with pytest.raises(ClusterKeyError, match="do not belong together"):
        NodeCredentials.parse(mixed)
    foreign = b.tls.key_pem.decode() + b.tls.cert_pem.decode() + a.tls.ca_pem.decode()
    with pytest.raises(ClusterKeyError, match="not signed by its CA"):
        NodeCredentials.parse(foreign)
    with pytest.raises(ClusterKeyError, match="not an edgeshard credentials file"):
        NodeCredentials.parse("hello")
    for bad in ("", "x" * 65, "a/b", "édgé", "edgeshard-node"):
        with pytest.raises(ClusterKeyError):
            issue(key, bad)


def test_signed_tokens_admit_members_and_refuse_strangers_replays_and_other_methods():
    key = ClusterKey.generate()
    verifier = _verifier(key)
    board = signer_for(issue(key, "board1"))
    assert verifier.check_metadata(GET_INFO, board.metadata(GET_INFO)) is None
    holder = signer_for(key)  # a holder of the cluster key signs with the derived certificate
    assert verifier.check_metadata(GET_INFO, holder.metadata(GET_INFO)) is None
    replay = board.metadata(GET_INFO)
    assert verifier.check_metadata(GET_INFO, replay) is None
    assert verifier.check_metadata(GET_INFO, replay) == "replayed cluster credentials"
    assert "invalid signature" in verifier.check_metadata(FORWARD, board.metadata(GET_INFO))
    stranger = signer_for(issue(ClusterKey.generate(), "board1"))
    assert "not of this cluster" in verifier.check_metadata(GET_INFO, stranger.metadata(GET_INFO))
    # another member's certificate with this one's signature: the signature does not verify
    token, cert = board.metadata(GET_INFO)
    other_cert = holder.metadata(GET_INFO)[1]
    assert "invalid signature" in verifier.check_metadata(GET_INFO, (token, other_cert))
    # malformed values of every kind: a typed reason, never an exception
    for junk in ("", "ES1-CERT 1.2.3", "ES1-CERT ²." + "a" * 86, b"\xff"):
        assert verifier.check_metadata(GET_INFO, ((token[0], junk), cert)) == "malformed cluster credentials"
    assert verifier.check_metadata(GET_INFO, (token, ("edgeshard-cert", "!" * 40))) is not None
    # an enrolled node holds no HMAC key: an HMAC-only caller is told why
    hmac_only = (("authorization", make_token(key.auth_key, GET_INFO)),)
    assert "enrolled" in verifier.check_metadata(GET_INFO, hmac_only)
    # a key holder's server takes either token
    both = _verifier(key, hmac=True)
    assert both.check_metadata(GET_INFO, hmac_only) is None
    assert both.check_metadata(GET_INFO, board.metadata(GET_INFO)) is None


def test_a_revocation_list_is_signed_by_the_ca_and_refuses_certificates_issued_before_it(tmp_path):
    key = ClusterKey.generate()
    store = RevocationStore(tmp_path / "rev.json", ca_certificates(key))
    verifier = _verifier(key, store)
    board = signer_for(issue(key, "board1"))
    keep = signer_for(issue(key, "board2"))
    lst = RevocationList().with_revoked(key, "board1")
    assert store.offer(lst.to_bytes()) == (True, "")
    assert "board1 is revoked" in verifier.check_metadata(GET_INFO, board.metadata(GET_INFO))
    assert verifier.check_metadata(GET_INFO, keep.metadata(GET_INFO)) is None
    # persisted (0600) and read back; an older or equal list is not taken; a stranger's list never
    assert (tmp_path / "rev.json").stat().st_mode & 0o777 == 0o600
    assert RevocationStore(tmp_path / "rev.json", ca_certificates(key)).current.revoked.keys() == {"board1"}
    assert store.offer(lst.to_bytes())[0] is False
    forged = RevocationList().with_revoked(ClusterKey.generate(), "board2")
    forged = RevocationList(forged.revoked, 99, forged.cluster, forged.signature)
    taken, why = store.offer(forged.to_bytes())
    assert not taken and "not signed by this cluster's CA" in why
    tampered = json.loads(lst.to_bytes())
    tampered["revoked"]["board2"] = 1
    tampered["seq"] = 5
    assert store.offer(json.dumps(tampered).encode())[0] is False
    assert verifier.check_metadata(GET_INFO, keep.metadata(GET_INFO)) is None
    # a board re-enrolled under the same name after the revocation is a new certificate: accepted
    later = signer_for(issue(key, "board1", now=time.time() + 2 * 300 + 5))
    assert verifier.check_metadata(GET_INFO, later.metadata(GET_INFO)) is None
    # a corrupt list file stops the process (fail closed) rather than letting revoked nodes back in
    (tmp_path / "rev.json").write_text("{}")
    with pytest.raises(ClusterKeyError, match="not a valid revocation list"):
        RevocationStore(tmp_path / "rev.json", ca_certificates(key))


def test_a_rotation_re_enrols_with_both_cas_trusted(tmp_path):
    old, new = ClusterKey.generate(), ClusterKey.generate()
    board = issue(
        new.with_accepted(old), "board1"
    )  # `secret enrol --cluster-key-file new --cluster-key-file old`
    assert len(board.ca_certs) == 2
    on_old = _verifier(old)
    on_ring = TokenVerifier(None, trust=Trust(ca_certificates(old.with_accepted(new))))
    assert "not of this cluster" in on_old.check_metadata(GET_INFO, signer_for(board).metadata(GET_INFO))
    assert on_ring.check_metadata(GET_INFO, signer_for(board).metadata(GET_INFO)) is None
    # the board, trusting both CAs, takes calls from key holders at either step of the rotation
    board_side = TokenVerifier(None, trust=Trust(board.ca_certs))
    for k in (old, new, old.with_accepted(new)):
        assert board_side.check_metadata(GET_INFO, signer_for(k).metadata(GET_INFO)) is None


def _cli(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeshard.coordinator.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


async def _info(address: str, security) -> pb.NodeInfo:
    async with channel(address, security) as ch:
        return await pb_grpc.NodeStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)


@pytest.mark.slow
def test_three_enrolled_nodes_revoke_one_and_the_rest_keep_serving(smollm2_path, tmp_path):
    """Three nodes, each with its own credentials and no cluster key. `secret revoke node3 --peers ...` (the
    real CLI) pushes the signed list; from then on nodes 1 and 2 refuse node 3's calls (UNAUTHENTICATED
    naming the revocation), a coordinator refuses node 3 as a candidate, the list survives a restart, and
    `run --peers` over all three skips node 3 and gives the same greedy tokens as one process."""
    key = ClusterKey.generate()
    key_file = key.save(tmp_path / "cluster.key")
    revocations = tmp_path / "coordinator-revocations.json"
    channels.use_revocation_file(revocations)
    creds = [issue(key, f"node{i}") for i in (1, 2, 3)]
    model_dir = Path(smollm2_path).parent
    prompt, n_tokens = "The capital of France is", 8
    env = {"EDGESHARD_REVOCATIONS": str(revocations)}
    reference = _cli(
        "run",
        "--local",
        "--threads",
        "1",
        "--model",
        str(smollm2_path),
        "--prompt",
        prompt,
        "--max-tokens",
        str(n_tokens),
        "--json",
    )
    assert reference.returncode == 0, reference.stderr
    want = json.loads(reference.stdout.strip().splitlines()[-1])["tokens"]
    nodes = [
        LocalNodes(1, model_dir=model_dir, name=f"node{i + 1}", security=c, node_args=["--log-level", "INFO"])
        for i, c in enumerate(creds)
    ]
    try:
        addresses = [n.start()[0] for n in nodes]
        log1 = (nodes[0].log_dir / "node11.log").read_text()
        assert "own credentials as node1" in log1  # started without the cluster key
        assert "es1-" not in (nodes[0].log_dir / "node.creds").read_text()

        async def before():
            # a member calls another with its own credentials (node 3 -> node 1), the coordinator (key holder)
            # confirms all three
            assert (await _info(addresses[0], creds[2])).name == "node11"
            return [await confirm(a, a, "peers", security=key) for a in addresses]

        assert [m.status for m in asyncio.run(before())] == ["ok", "ok", "ok"]
        peers = ",".join(addresses)
        r = _cli(
            "secret",
            "revoke",
            "node3",
            "--cluster-key-file",
            str(key_file),
            "--revocation-file",
            str(revocations),
            "--peers",
            peers,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("took list 1") == 3, r.stderr

        async def after():
            for a in addresses[:2]:  # node 3's calls are refused by both others
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _info(a, creds[2])
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "node3 is revoked" in e.value.details()
                assert (await _info(a, creds[0])).creds_revocation_seq == 1  # the others still get in
            channels._revocations.clear()  # this process re-reads the list `secret revoke` wrote
            return [await confirm(a, a, "peers", security=key) for a in addresses]

        members = asyncio.run(after())
        assert [m.status for m in members] == ["ok", "ok", "revoked"]
        assert "node3 is revoked" in members[2].problem
        # the list survives a restart of a node (kept in its state directory)
        nodes[1].stop()
        nodes[1].procs.clear()
        addresses[1] = nodes[1].start()[0]

        async def restarted():
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _info(addresses[1], creds[2])
            assert "node3 is revoked" in e.value.details()

        asyncio.run(restarted())
        common = ["--model", str(smollm2_path), "--prompt", prompt, "--max-tokens", str(n_tokens), "--json"]
        common += ["--cluster-key-file", str(key_file)]
        refused = _cli("run", "--peers", ",".join(addresses), *common, env=env)
        assert refused.returncode != 0
        said = refused.stderr.strip().splitlines()
        assert len(said) == 1 and said[0].startswith("edgeshard: error: ") and "node3 is revoked" in said[0]
        run = _cli("run", "--peers", ",".join(addresses[:2]), *common, env=env)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["tokens"] == want
        assert [p["address"] for p in out["plan"]] == addresses[:2]
    finally:
        for n in nodes:
            n.stop()
        channels.use_revocation_file(None)
        channels._revocations.clear()


def test_an_enrolled_node_signs_its_adverts_with_its_own_key():
    from edgeshard.node.security.advert_proof import sign_txt, verify_any

    key = ClusterKey.generate()
    store = RevocationStore(None, ca_certificates(key))
    trust = Trust(ca_certificates(key), store)
    board = issue(key, "board1")
    name, port = "board1-ab._edgeshard._tcp.local.", 5555
    txt = sign_txt({"id": "n", "cluster": "c"}, port, board, name=name, addresses=["127.0.0.1"])
    assert "mac" not in txt and "sig" in txt and all(len(v) <= 250 for v in txt.values())
    ok = dict(name=name, addresses=["127.0.0.1"], trust=trust)
    assert verify_any(txt, port, key, **ok) is None
    assert verify_any(txt, port, board, **ok) is None  # an enrolled coordinator checks it the same way
    assert "re-announced" in verify_any({**txt, "cluster": "d"}, port, key, **ok)
    assert "re-announced" in verify_any(txt, port + 1, key, **ok)
    assert "re-announced" in verify_any(txt, port, key, **{**ok, "name": "x._edgeshard._tcp.local."})
    assert "signed" in verify_any(txt, port, key, **{**ok, "addresses": ["127.0.0.2"]})
    old = sign_txt({"id": "n"}, port, board, name=name, addresses=["127.0.0.1"], now=time.time() - 3600)
    assert "s old" in verify_any(old, port, key, **ok)
    stranger = sign_txt(
        {"id": "n"}, port, issue(ClusterKey.generate(), "b"), name=name, addresses=["127.0.0.1"]
    )
    assert "not of this cluster" in verify_any(stranger, port, key, **ok)
    store.offer(RevocationList().with_revoked(key, "board1").to_bytes())
    assert "board1 is revoked" in verify_any(txt, port, key, **ok)
    # a key holder's (HMAC) advert cannot be checked by an enrolled coordinator: said so, not accepted
    held = sign_txt({"id": "n"}, port, key, name=name, addresses=["127.0.0.1"])
    assert "does not hold" in verify_any(held, port, board, **ok)


class _AdvertisedNode(LocalNodes):
    """One enrolled node process announcing itself on mDNS, 127.0.0.1 only, in `cluster`."""

    def __init__(self, cluster: str, creds: NodeCredentials) -> None:
        super().__init__(1, threads=1, name=f"cred-{cluster[-4:]}-", security=creds)
        self.cluster = cluster

    def command(self, i: int) -> list[str]:
        cmd = [a for a in super().command(i) if a != "--no-advertise"]
        return cmd + ["--mdns-interface", "127.0.0.1", "--cluster", self.cluster, "--no-benchmark"]


@pytest.mark.slow
def test_discovery_finds_an_enrolled_node_and_ignores_it_once_revoked(tmp_path):
    """mDNS on 127.0.0.1: a coordinator holding the cluster key verifies an enrolled node's advert (signed
    with its own key) and confirms it; once the coordinator holds a list revoking it, the same advert is a
    stranger's ("revoked"), never dialled into the table."""
    import uuid

    from edgeshard.coordinator.discovery.mdns import ZeroconfDiscovery

    key = ClusterKey.generate()
    cluster = f"cred-{uuid.uuid4().hex[:10]}"
    channels.use_revocation_file(tmp_path / "revocations.json")
    channels._revocations.clear()

    async def browse():
        discovery = ZeroconfDiscovery(["127.0.0.1"], cluster, watch_interval=0, security=key)
        try:
            return await discovery.browse(4.0), dict(discovery.strangers)
        finally:
            await discovery.close()

    try:
        with _AdvertisedNode(cluster, issue(key, "mdns-board")) as node:
            members, strangers = asyncio.run(browse())
            assert [m.address for m in members if m.ok] == node.addresses, (members, strangers)
            store = channels.revocations(key)
            assert store.offer(RevocationList().with_revoked(key, "mdns-board").to_bytes())[0]
            members, strangers = asyncio.run(browse())
            assert members == [] and any("mdns-board is revoked" in why for why in strangers.values()), (
                strangers
            )
    finally:
        channels.use_revocation_file(None)
        channels._revocations.clear()


def test_a_revocation_ends_the_calls_the_revoked_node_has_open(tmp_path):
    """A Forward stream lives as long as the ring. When a node takes a list revoking the caller, the streams
    that caller has open end (UNAUTHENTICATED) and new calls are refused; other members' calls go on."""
    key = ClusterKey.generate()
    revoked, kept = issue(key, "leaving"), issue(key, "staying")

    async def scenario(address: str) -> tuple[grpc.StatusCode, grpc.StatusCode | None]:
        async with (
            channel(address, revoked) as bad,
            channel(address, kept) as good,
            channel(address, key) as op,
        ):
            doomed = bad.stream_stream(FORWARD)(timeout=60)
            alive = good.stream_stream(FORWARD)(timeout=60)
            for call in (doomed, alive):  # both streams are open and answered
                await call.write(pb.ForwardMessage(session_id="x", plan_id=1).SerializeToString())
                await asyncio.wait_for(call.read(), 20)
            lst = RevocationList().with_revoked(key, "leaving").to_bytes()
            reply = await pb_grpc.NodeStub(op).PushRevocations(
                pb.CredsRevocations(signed_list=lst), timeout=10
            )
            assert reply.accepted and reply.seq == 1
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(doomed.read(), 20)
            await alive.write(pb.ForwardMessage(session_id="y", plan_id=1).SerializeToString())
            assert (
                pb.ForwardReply.FromString(await asyncio.wait_for(alive.read(), 20)).session_id == "y"
            )  # the other member's goes on
            alive.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.NodeStub(bad).GetInfo(pb.GetInfoRequest(), timeout=10)
            return ended.value.code(), refused.value.code()

    with LocalNodes(1, name="cut", security=issue(key, "host"), node_args=["--no-benchmark"]) as node:
        ended, refused = asyncio.run(scenario(node.addresses[0]))
        log = node.log_tail(0, 100_000)
    assert ended == refused == grpc.StatusCode.UNAUTHENTICATED
    assert "ending a call of leaving" in log and "Traceback" not in log, log[-3000:]
