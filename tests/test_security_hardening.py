"""Security hardening (issue #20): each finding of the review has a test here that fails on the old code.
Everything stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys

import grpc
import pytest
from raw_h2 import raw_grpc_call

from edgeshard.node.security.call_auth import AuthInterceptor, TokenVerifier, make_token
from edgeshard.node.security.cluster_key import ClusterKey
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc

GET_INFO = "/edgeshard.v1.Node/GetInfo"


# ------------------------------------------------------------------------ call tokens: strict, never a traceback
@pytest.mark.parametrize(
    "token",
    [
        "ES1-HMAC ²².nonce.mac",  # '²'.isdigit() is True, int('²') raises
        "ES1-HMAC ١٢٣.nonce." + "A" * 43,  # Arabic-Indic digits: int() accepts them, the grammar does not
        "ES1-HMAC 12.nönce." + "A" * 43,
        b"ES1-HMAC 12.nonce.mac",
        "ES1-HMAC 12..",
        "es1-hmac 12.n." + "A" * 43,
    ],
)
def test_tokens_parse_strictly_ascii_only(token):
    assert TokenVerifier(b"k" * 32).check(GET_INFO, token) == "malformed cluster credentials"


def test_a_valid_token_still_passes_the_strict_grammar():
    key = b"k" * 32
    assert TokenVerifier(key).check(GET_INFO, make_token(key, GET_INFO)) is None


class _Info(pb_grpc.NodeServicer):
    async def GetInfo(self, request, context):
        return pb.NodeInfo(name="reached")


def test_odd_auth_headers_are_unauthenticated_without_a_traceback(caplog):
    """Header bytes no gRPC library sends (a hand-made HTTP/2 client): each call is UNAUTHENTICATED (16), not
    UNKNOWN (2), and the node's log holds one rate-limited line per reason, no traceback."""
    values = ["ES1-HMAC ²².a.b".encode(), b"ES1-HMAC \xff\xfe.a.b", b"ES1-HMAC 12.\xff." + b"A" * 43]
    statuses = []

    async def scenario():
        server = grpc.aio.server(interceptors=[AuthInterceptor(b"k" * 32, "n1")])
        pb_grpc.add_NodeServicer_to_server(_Info(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            for value in values * 3:
                got = await asyncio.to_thread(
                    raw_grpc_call, "127.0.0.1", port, GET_INFO, [(b"authorization", value)]
                )
                statuses.append((got.get(b"grpc-status"), got.get(b"grpc-message", b"")))
        finally:
            await server.stop(0)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert all(code == b"16" for code, _ in statuses), statuses
    assert all(b"malformed cluster credentials" in msg for _, msg in statuses), statuses
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], caplog.text
    refusals = [r for r in caplog.records if "UNAUTHENTICATED" in r.getMessage()]
    assert len(refusals) == 1, caplog.text  # one peer host, one reason: rate limited to one line


# ------------------------------------------------------------------------------------------------- key files
def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EDGESHARD_CLUSTER_KEY"}
    cmd = [sys.executable, "-m", "edgeshard.coordinator.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_secret_new_force_never_writes_through_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"  # a file the attacker wants the key in (or wants overwritten)
    victim.write_text("precious\n")
    link = tmp_path / "cluster.key"
    link.symlink_to(victim)
    for force in ((), ("--force",)):
        r = _cli("secret", "new", "--out", str(link), *force)
        assert r.returncode != 0 and r.stderr.startswith("edgeshard: error:"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert victim.read_text() == "precious\n" and link.is_symlink()
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        ClusterKey.generate().save(dangling)
    assert not (tmp_path / "nowhere").exists()


def test_a_replaced_key_is_private_from_its_first_byte(tmp_path):
    """`--force` over a file that was readable: a reader holding it open (opened while it was readable) must
    not see the new key; the old code truncated and wrote the same inode, then chmod-ed it."""
    path = tmp_path / "cluster.key"
    old = ClusterKey.generate()
    path.write_text(old.text + "\n")
    path.chmod(0o644)
    with open(path) as reader:  # another user's descriptor, opened while the mode allowed it
        new = ClusterKey.generate()
        new.save(path, overwrite=True)
        reader.seek(0)
        assert new.text not in reader.read()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and ClusterKey.load(path) == new
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.key"]  # no temporary file left behind


def test_a_new_key_file_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = ClusterKey.generate().save(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
