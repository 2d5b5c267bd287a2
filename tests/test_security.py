"""Only cluster members get in: cluster keys, TLS material, call tokens, mDNS proofs (fast), and real nodes
refusing strangers, stale keys and plaintext (slow). Everything stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import grpc
import pytest
import torch

from edgeshard.coordinator.pipeline.stage_client import GrpcStageClient, NotAMemberError
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.sampling import Sampler, SamplingParams
from edgeshard.node.security.advert_proof import sign_txt, verify_txt
from edgeshard.node.security.call_auth import TokenPlugin, TokenVerifier, make_token
from edgeshard.node.security.channels import INSECURE, channel, connection_problem
from edgeshard.node.security.cluster_key import ClusterKey, ClusterKeyError
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc

FORWARD = "/edgeshard.v1.Node/Forward"


# ---------------------------------------------------------------------------------------------- cluster key
def test_key_text_round_trips_and_derives_the_same_tls_everywhere():
    key = ClusterKey.generate()
    assert key.text.startswith("es1-") and len(key.text) == 47
    again = ClusterKey.parse(f"  {key.text}\n")
    assert again == key and again.tls == key.tls  # byte-identical PEM: every member builds the same root
    assert again.fingerprint == key.fingerprint and key.text not in repr(key)
    other = ClusterKey.generate()
    assert other.tls.ca_pem != key.tls.ca_pem and other.auth_key != key.auth_key
    assert len({key.auth_key, key.mdns_key, key.derive("ca")}) == 3  # independent derivations


@pytest.mark.parametrize("text", ["", "es1-", "es2-AAAA", "hello", "es1-" + "A" * 42, "es1-" + "!" * 43])
def test_malformed_keys_are_refused(text):
    with pytest.raises(ClusterKeyError):
        ClusterKey.parse(text)


def test_key_file_is_private_and_never_silently_replaced(tmp_path):
    key = ClusterKey.generate()
    path = key.save(tmp_path / "cluster.key")
    assert path.stat().st_mode & 0o777 == 0o600 and ClusterKey.load(path) == key
    with pytest.raises(FileExistsError):
        ClusterKey.generate().save(path)
    path.chmod(0o644)
    assert ClusterKey.loose_permissions(path)


@pytest.mark.slow  # starts CLI processes
def test_cli_makes_a_key_and_a_node_without_one_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDGESHARD_CLUSTER_KEY"}
    cli = [sys.executable, "-m", "edgeshard.coordinator.cli"]
    made = subprocess.run(
        [*cli, "secret", "new", "--out", str(tmp_path / "k")], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    assert "--cluster-key-file" in made.stderr and (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    shown = subprocess.run(
        [*cli, "secret", "id", "--cluster-key-file", str(tmp_path / "k")], capture_output=True, text=True
    )
    assert shown.stdout.strip() == ClusterKey.load(tmp_path / "k").fingerprint
    node = subprocess.run(
        [*cli, "node", "--port", "0", "--no-advertise", "--no-benchmark"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert node.returncode == 2 and "edgeshard secret new" in node.stderr, node.stderr
    assert "Traceback" not in node.stderr


# ---------------------------------------------------------------------------------------------- call tokens
def test_tokens_bind_key_method_time_and_are_single_use():
    key, other = ClusterKey.generate(), ClusterKey.generate()
    verifier = TokenVerifier(key.auth_key, window_s=300)
    now = time.time()
    token = make_token(key.auth_key, FORWARD, now)
    assert verifier.check(FORWARD, token, now) is None
    assert verifier.check(FORWARD, token, now) == "replayed cluster credentials"
    assert verifier.check(FORWARD, make_token(other.auth_key, FORWARD, now), now) == "wrong cluster key"
    assert verifier.check("/edgeshard.v1.Node/LoadShard", make_token(key.auth_key, FORWARD, now), now)
    assert "clock skew" in verifier.check(FORWARD, make_token(key.auth_key, FORWARD, now - 400), now)
    for junk in (None, "", "Bearer x", "ES1-HMAC 1.2", "ES1-HMAC x.y.z", "ES1-HMAC " + "9" * 40 + ".n.m"):
        assert verifier.check(FORWARD, junk, now) is not None


def test_connection_problems_are_explained():
    wrong_ca = "Tls handshake failed (TSI_PROTOCOL_FAILURE): ... CERTIFICATE_VERIFY_FAILED: unable to get"
    assert "different (or stale) cluster key" in connection_problem(wrong_ca)
    assert "--insecure" in connection_problem("SSL_ERROR_SSL: ... WRONG_VERSION_NUMBER")
    assert "closes plaintext" in connection_problem("ipv4:127.0.0.1:1: Socket closed", INSECURE)
    assert connection_problem("ipv4:127.0.0.1:1: Connection refused") is None


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1.3e-149, 5e-324])
def test_tiny_temperatures_sample_the_argmax_instead_of_failing(temperature):
    """Found by fuzzing the HTTP API: logits / T overflowed (or T was 0 in float32) and softmax gave NaN."""
    logits = torch.randn(1000) * 10
    for top_p, top_k in ((1.0, 0), (0.5, 5)):
        sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=3))
        assert sampler(logits, 7) == int(logits.argmax())
    with pytest.raises(ValueError):
        SamplingParams(temperature=float("nan"))


# ---------------------------------------------------------------------------------------------- mDNS proofs
def test_advert_proof_detects_strangers_tampering_other_keys_and_replays():
    key, old = ClusterKey.generate(), ClusterKey.generate()
    txt = {"id": "abc", "name": "pi\nname=evil", "cluster": "lab", "mem_free": "100"}
    signed = sign_txt(txt, 50051, key)
    assert verify_txt(signed, 50051, key) is None
    assert verify_txt({k.encode(): v.encode() for k, v in signed.items()}, 50051, key) is None  # as parsed
    assert "no membership proof" in verify_txt(txt, 50051, key)
    assert "forged, altered" in verify_txt({**signed, "mem_free": "999"}, 50051, key)
    assert "forged, altered" in verify_txt(signed, 50052, key)  # the port is signed too
    assert "another cluster key" in verify_txt(sign_txt(txt, 50051, old), 50051, key)  # a stale key
    assert "old" in verify_txt(sign_txt(txt, 50051, key, now=time.time() - 3600), 50051, key)


# ---------------------------------------------------------------------------------------------- real nodes
@pytest.fixture(scope="module")
def keyed_node():
    """One node process holding a fresh cluster key (the cluster's current one, after a rotation)."""
    key = ClusterKey.generate()
    with LocalNodes(1, threads=1, name="keyed", security=key) as cluster:
        yield cluster, key


def _stranger_channel(address: str, key: ClusterKey, token_key: bytes | None) -> grpc.aio.Channel:
    """A client that completes TLS with the node (standing for one that skips certificate verification, which
    any TLS library allows) but holds no valid token: only the node's interceptor stands in its way."""
    creds = grpc.ssl_channel_credentials(root_certificates=key.tls.ca_pem)
    if token_key is not None:
        creds = grpc.composite_channel_credentials(
            creds, grpc.metadata_call_credentials(TokenPlugin(token_key))
        )
    return grpc.aio.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", "edgeshard-node")]
    )


async def _try_everything(ch: grpc.aio.Channel) -> list[grpc.aio.AioRpcError]:
    """Every method a stranger could use to do something: load a shard, open a session, subscribe, look."""
    stub = pb_grpc.NodeStub(ch)
    errors = []
    load = pb.LoadShardRequest(model="smollm2-135m", start_layer=0, end_layer=30, next_hop="last", plan_id=7)
    attempts = [
        lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=10),
        lambda: stub.Health(pb.HealthRequest(reply_bytes=1000), timeout=10),
        lambda: _drain(stub.LoadShard(load, timeout=10)),
        lambda: _drain(stub.Results(pb.ResultsRequest(subscriber="x"), timeout=10)),
        lambda: _forward_open(stub),
    ]
    for attempt in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await attempt()
        errors.append(e.value)
    return errors


async def _drain(call) -> None:
    async for _ in call:
        pass


async def _forward_open(stub) -> None:
    call = stub.Forward(timeout=10)
    await call.write(pb.ForwardMessage(plan_id=7, session_id="s", open=pb.OpenSession()))
    await call.read()


async def _member_view(address: str, key: ClusterKey) -> pb.NodeInfo:
    client = GrpcStageClient(address, security=key)
    try:
        return await client.info()
    finally:
        await client.close()


@pytest.mark.slow
def test_strangers_and_stale_keys_are_refused_and_logged_and_can_do_nothing(keyed_node):
    cluster, key = keyed_node
    address = cluster.addresses[0]
    stale = ClusterKey.generate()  # the key before the cluster was rotated to `key`

    async def scenario():
        # a coordinator with the stale key refuses the node at the handshake (its certificate is not of its CA)
        client = GrpcStageClient(address, security=stale)
        with pytest.raises(NotAMemberError, match="different \\(or stale\\) cluster key"):
            await client.info()
        await client.close()
        async with channel(address, stale) as ch:
            for e in await _try_everything(ch):
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in e.details()
        # plaintext (no key at all): the node speaks only TLS, the connection dies in the handshake
        async with channel(address, INSECURE) as ch:
            for e in await _try_everything(ch):
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        # past TLS without a token, or with a token of the stale key: UNAUTHENTICATED, from the node itself
        for token_key, why in ((None, "no cluster credentials"), (stale.auth_key, "wrong cluster key")):
            async with _stranger_channel(address, key, token_key) as ch:
                for e in await _try_everything(ch):
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
                    assert why in e.details() and "keyed1" in e.details()
        return await _member_view(address, key)

    info = asyncio.run(scenario())
    assert not info.loaded and info.stats.messages == 0 and info.stats.sessions == 0
    log = cluster.log_tail(0, 400)
    # logged with the caller's address (rate limited: once per peer host and reason a minute)
    assert "UNAUTHENTICATED /edgeshard.v1.Node/" in log and "from ipv4:127.0.0.1:" in log, log
    assert "no cluster credentials" in log and "wrong cluster key" in log


@pytest.mark.slow
def test_members_get_in(keyed_node):
    cluster, key = keyed_node
    info = asyncio.run(
        _member_view(cluster.addresses[0], ClusterKey.parse(key.text))
    )  # the same key, re-read
    assert info.name == "keyed1" and info.protocol_version > 0
