"""Security hardening (issue #20): each finding of the review has a test here that fails on the old code.
Everything stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import subprocess
import sys

import grpc
import pytest
from raw_h2 import raw_grpc_call

from edgeshard.node.security.call_auth import AuthInterceptor, TokenVerifier, make_token
from edgeshard.node.security.channels import INSECURE, server_interceptors
from edgeshard.node.security.cluster_key import ClusterKey
from edgeshard.node.trust import cpu_identity, trusted_file, untrusted_reason
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


# ------------------------------------------------------------------------------------------ loading native code
EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("EDGESHARD_TEST_MARKER"), "w");  /* proof that the planted code ran */
    if (f) { fputs("ran", f); fclose(f); }
}
"""


@pytest.fixture()
def planted_kernels(tmp_path, monkeypatch):
    """A kernel cache holding, under the exact name the node computes, a library that records being loaded.
    The fake compiler just copies it (so `build` names it as it would a real build). The cache is used only
    with EDGESHARD_BUILD_KERNELS=1 (a developer's build of the C); installed kernels live in the package."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the planted library")
    evil_c = tmp_path / "evil.c"
    evil_c.write_text(EVIL_C)
    evil = tmp_path / "evil.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(evil), str(evil_c)], check=True, timeout=120)
    fake_cc = tmp_path / "fake-cc"
    fake_cc.write_text(f'#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\ncp {evil} "$2"\n')
    fake_cc.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("EDGESHARD_HOME", str(home))
    monkeypatch.setenv("CC", str(fake_cc))
    monkeypatch.setenv("EDGESHARD_TEST_MARKER", str(tmp_path / "marker"))
    monkeypatch.setenv("EDGESHARD_BUILD_KERNELS", "1")
    monkeypatch.setenv("EDGESHARD_KERNELS", "generic")  # plain C: a set every machine runs
    from edgeshard.node.lowbit import native

    target = native.build(str(fake_cc), "generic")  # where a real build would land; nothing is loaded here
    assert target.parent == home / "kernels"
    return target, tmp_path / "marker"


def _native_status() -> subprocess.CompletedProcess:
    code = "from edgeshard.node.lowbit import native\nprint(native.available())\nprint(native.status())\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("how", ["world-writable file", "world-writable cache dir", "another user's file"])
def test_a_planted_kernel_library_is_not_loaded_and_the_reason_is_said(planted_kernels, how):
    target, marker = planted_kernels
    if how == "world-writable file":
        target.chmod(0o666)
        expect = "is writable by everyone"
    elif how == "world-writable cache dir":
        target.parent.chmod(0o777)
        expect = "kernels is writable by everyone"
    else:
        if os.geteuid() != 0:
            pytest.skip("making a file another user's needs root")
        os.chown(target, 65534, 65534)
        expect = "is owned by another user"
    r = _native_status()
    assert not marker.exists(), "the planted library was loaded"
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False"
    assert "refusing to load" in r.stdout and expect in r.stdout, r.stdout


def test_trusted_files_are_ours_all_the_way_up(tmp_path):
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True)
    for x in (tmp_path / "a", d):
        x.chmod(0o755)
    f = d / "lib.so"
    f.write_bytes(b"x")
    f.chmod(0o644)
    assert trusted_file(f), untrusted_reason(f)  # (the pytest tmp root is ours, 0700, under sticky /tmp)
    link = d / "link.so"
    link.symlink_to(f)
    assert "symbolic link" in untrusted_reason(link)
    (tmp_path / "a").chmod(0o775)
    assert "writable by its group" in untrusted_reason(f)
    (tmp_path / "a").chmod(0o755)
    assert untrusted_reason(d) == f"{d} is not a regular file"
    assert "No such file" in untrusted_reason(d / "missing.so")


def test_the_kernel_cache_key_names_the_cpu(planted_kernels, monkeypatch):
    """A build for one CPU must not be loaded on another (a home shared by different CPUs could SIGILL):
    another CPU model or flag set gets another library name."""
    from edgeshard.node.lowbit import native

    target, _ = planted_kernels
    assert "flags" in cpu_identity() or "Features" in cpu_identity() or not os.path.exists("/proc/cpuinfo")
    monkeypatch.setattr(native, "cpu_identity", lambda: "model name: another CPU\nflags: sse2")
    other = native.build(os.environ["CC"], "generic")
    assert other != target and other.parent == target.parent


# ------------------------------------------------------------------------------------- corrupt wire messages
class _Echo(pb_grpc.NodeServicer):
    async def GetInfo(self, request, context):
        return pb.NodeInfo(name="reached")

    async def Forward(self, request_iterator, context):
        async for msg in request_iterator:
            yield pb.ForwardReply(session_id=msg.session_id)


def test_corrupt_requests_are_invalid_argument_without_a_traceback(caplog):
    """Bytes that are not a protobuf message (found by benchmarks/fuzz.py): UNKNOWN plus a traceback per call
    before; now INVALID_ARGUMENT, one rate-limited line, and a stream ends at its first corrupt message."""
    got = {}

    async def scenario():
        server = grpc.aio.server(interceptors=server_interceptors(INSECURE))
        pb_grpc.add_NodeServicer_to_server(_Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                info = ch.unary_unary(GET_INFO)
                for raw in (b"\xff\xff\xff", b"\x0a\x05ab"):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await info(raw, timeout=10)
                    got.setdefault("unary", []).append(e.value.code())
                got["valid"] = pb.NodeInfo.FromString(await info(b"", timeout=10)).name
                call = ch.stream_stream("/edgeshard.v1.Node/Forward")()
                await call.write(pb.ForwardMessage(session_id="a").SerializeToString())
                got["first"] = pb.ForwardReply.FromString(await call.read()).session_id
                await call.write(b"\xff\xff")
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call.read()
                got["stream"] = e.value.code()
        finally:
            await server.stop(0)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert got["unary"] == [grpc.StatusCode.INVALID_ARGUMENT] * 2 and got["valid"] == "reached", got
    assert got["first"] == "a" and got["stream"] == grpc.StatusCode.INVALID_ARGUMENT, got
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], caplog.text


@pytest.mark.slow
def test_a_node_refuses_the_planted_library_and_says_why(planted_kernels):
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes

    target, marker = planted_kernels
    target.chmod(0o666)
    with LocalNodes(1, threads=1, name="planted", security=ClusterKey.generate()) as node:
        log = node.log_tail(0, 50)
    assert not marker.exists(), "the node loaded the planted library"
    assert "using torch's kernels" in log and "refusing to load" in log and "writable by everyone" in log, log
