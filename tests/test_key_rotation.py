"""Key rotation with overlap: members accept the current and the next cluster key for a while, so a cluster
moves to a new key one member at a time without losing a request. Real node processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from edgeshard.coordinator.pipeline.deploy import deploy
from edgeshard.coordinator.pipeline.generate import Sequence, generate
from edgeshard.coordinator.pipeline.stage_client import GrpcStageClient, NotAMemberError
from edgeshard.coordinator.sdk.local_nodes import LocalNodes
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.security.advert_proof import sign_txt, verify_any
from edgeshard.node.security.call_auth import TokenVerifier, make_token
from edgeshard.node.security.channels import security_from_args
from edgeshard.node.security.cluster_key import ClusterKey

PROMPT = [1, 504, 3458, 282, 4649, 314, 8411, 30]
LAYERS = 30
GET_INFO = "/edgeshard.v1.Node/GetInfo"


def test_a_keyring_accepts_the_next_key_and_presents_the_primary(tmp_path):
    old, new = ClusterKey.generate(), ClusterKey.generate()
    ring = old.with_accepted(new)
    assert ring == old and ring.fingerprint == old.fingerprint and ring.keys == (old, new)
    assert ClusterKey.load(ring.save(tmp_path / "ring.key")).keys == (old, new)  # one key per line
    (tmp_path / "old.key").write_text(old.text + "\n")
    (tmp_path / "new.key").write_text(new.text + "\n")

    class Args:
        cluster_key_file = [tmp_path / "new.key", tmp_path / "old.key"]  # --cluster-key-file twice
        insecure = False

    assert security_from_args(Args()).keys == (new, old)
    verifier = TokenVerifier(old.auth_key, also=(new.auth_key,))
    assert verifier.check(GET_INFO, make_token(new.auth_key, GET_INFO)) is None
    assert verifier.check(GET_INFO, make_token(old.auth_key, GET_INFO)) is None
    other = ClusterKey.generate()
    assert verifier.check(GET_INFO, make_token(other.auth_key, GET_INFO)) == "wrong cluster key"
    txt = sign_txt({"id": "n"}, 5, new, name="n._edgeshard._tcp.local.", addresses=["127.0.0.1"])
    assert verify_any(txt, 5, ring, name="n._edgeshard._tcp.local.") is None
    assert verify_any(txt, 5, old, name="n._edgeshard._tcp.local.") is not None


async def _generate(addresses: list[str], model: str, key: ClusterKey) -> list[int]:
    d = await deploy(addresses, model, LAYERS, security=key)
    pipe = await d.pipeline()
    try:
        return [t async for t in generate(pipe, Sequence(PROMPT, SamplingParams(), 6))]
    finally:
        await pipe.aclose()
        await d.close()


@pytest.mark.slow
def test_a_rotation_with_overlap_loses_no_request(smollm2_path):
    """Mid-rotation, the members are at different steps: node 1 still presents the old key but accepts the
    new one, node 2 already presents the new one and still accepts the old. A two-stage pipeline across them
    (node 1 dials node 2 with the old key's token, node 2 trusts node 1's old certificate) and coordinators at
    either step all get the same tokens as before the rotation; only a member left behind entirely (old key
    alone) is refused, and after the rotation the old key is refused everywhere."""
    old, new = ClusterKey.generate(), ClusterKey.generate()
    model_dir, model = Path(smollm2_path).parent, Path(smollm2_path).name

    async def scenario():
        with LocalNodes(1, model_dir=model_dir, threads=1, name="before", security=old) as before:
            reference = await _generate(before.addresses, model, old)
        with (
            LocalNodes(1, model_dir=model_dir, threads=1, name="rot-a", security=old.with_accepted(new)) as a,
            LocalNodes(1, model_dir=model_dir, threads=1, name="rot-b", security=new.with_accepted(old)) as b,
        ):
            pipeline = [a.addresses[0], b.addresses[0]]
            # coordinators at both steps of the rotation (one after the other: each deploys its own plan)
            for key in (old.with_accepted(new), new.with_accepted(old), old.with_accepted(new)):
                assert await _generate(pipeline, model, key) == reference, key
            # a coordinator still on the old key alone cannot verify node b (it presents the new key) ...
            client = GrpcStageClient(b.addresses[0], security=old)
            with pytest.raises(NotAMemberError):
                await client.info()
            await client.close()
            # ... and a stranger's key is refused by both
            for address in pipeline:
                client = GrpcStageClient(address, security=ClusterKey.generate().with_accepted(old, new))
                with pytest.raises((NotAMemberError, grpc.aio.AioRpcError)):
                    await client.info()
                await client.close()
        with LocalNodes(1, model_dir=model_dir, threads=1, name="after", security=new) as after:
            assert await _generate(after.addresses, model, new) == reference
            client = GrpcStageClient(after.addresses[0], security=old.with_accepted(new))  # old token
            with pytest.raises(NotAMemberError, match="refused our cluster credentials"):
                await client.info()
            await client.close()

    asyncio.run(scenario())


def test_secret_rotate_makes_the_next_key_and_says_the_steps(tmp_path):
    current = ClusterKey.generate()
    current.save(tmp_path / "cluster.key")
    env = {k: v for k, v in os.environ.items() if k != "EDGESHARD_CLUSTER_KEY"}
    cli = [sys.executable, "-m", "edgeshard.coordinator.cli", "secret", "rotate"]
    args = ["--cluster-key-file", str(tmp_path / "cluster.key"), "--out", str(tmp_path / "next.key")]
    r = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    nxt = ClusterKey.load(tmp_path / "next.key")
    assert nxt != current and (tmp_path / "next.key").stat().st_mode & 0o777 == 0o600
    assert (
        f"--cluster-key-file {tmp_path / 'next.key'} --cluster-key-file {tmp_path / 'cluster.key'}"
        in r.stderr
    )
    again = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a key
