"""The `secret` subcommand: cluster keys.

edgeshard secret new --out cluster.key     # a new cluster key, written readable by you only
edgeshard secret id --cluster-key-file cluster.key   # its public id: compare it across machines
edgeshard secret api-key --out api.key     # a key for the HTTP API (serve --api-key-file api.key)
edgeshard secret rotate --cluster-key-file cluster.key --out next.key   # the next key + the steps
edgeshard secret enrol board1 --cluster-key-file cluster.key --out board1.creds   # a node's own credentials
edgeshard secret revoke board1 --cluster-key-file cluster.key --peers a:50051,b:50051   # remove one board

Every command that talks to nodes takes `--cluster-key-file`/`--insecure` (main.py's table says which; `node`
has its own; `cluster` and `demo` make an ephemeral key for the nodes they start). See docs/security.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from edgeshard.coordinator.errors import UserError
from edgeshard.node.security.channels import add_security_args, security_from_args
from edgeshard.node.security.cluster_key import ENV_VAR, ClusterKey
from edgeshard.node.security.files import UnsafePathError, write_private


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`secret new|id`."""
    secret = sub.add_parser("secret", help="make a cluster key (only nodes and coordinators holding it join)")
    ssub = secret.add_subparsers(dest="secret_command", required=True)
    new = ssub.add_parser("new", help="make a new cluster key")
    new.add_argument("--out", type=Path, default=None, help="write it to FILE (mode 0600) instead of stdout")
    new.add_argument("--force", action="store_true", help="replace FILE if it exists (the old key is lost)")
    new.set_defaults(func=cmd_secret_new)
    show = ssub.add_parser("id", help="print the public id of a cluster key (safe to compare and share)")
    add_security_args(show)
    show.set_defaults(func=cmd_secret_id)
    rotate = ssub.add_parser(
        "rotate", help="make the next cluster key and print how to move the cluster to it without stopping"
    )
    add_security_args(rotate)
    rotate.add_argument("--out", type=Path, required=True, help="where to write the next key (mode 0600)")
    rotate.set_defaults(func=cmd_secret_rotate)
    enrol = ssub.add_parser(
        "enrol",
        aliases=["enroll"],
        help="give one node its own key pair and certificate (it then runs without the cluster key)",
    )
    enrol.add_argument("name", help="the node's name (as its --name; shown in logs and in `secret revoke`)")
    add_security_args(enrol)
    enrol.add_argument("--out", type=Path, required=True, help="where to write the credentials (mode 0600)")
    enrol.add_argument("--force", action="store_true", help="replace FILE if it exists")
    enrol.set_defaults(func=cmd_secret_enrol)
    revoke = ssub.add_parser(
        "revoke", help="revoke one enrolled node: every member that learns the list refuses it"
    )
    revoke.add_argument("name", help="the name the node was enrolled under")
    add_security_args(revoke)
    revoke.add_argument(
        "--revocation-file",
        type=Path,
        default=None,
        help="the signed list to extend (default: revocations.json in the state directory, which this "
        "machine's coordinators read)",
    )
    revoke.add_argument(
        "--peers",
        default="",
        metavar="HOST:PORT,...",
        help="push the list to these nodes now (members also learn it from any coordinator holding it)",
    )
    revoke.set_defaults(func=cmd_secret_revoke)
    api = ssub.add_parser("api-key", help="make a random API key for the HTTP API (serve --api-key-file)")
    api.add_argument("--out", type=Path, default=None, help="write it to FILE (mode 0600) instead of stdout")
    api.add_argument("--force", action="store_true", help="replace FILE if it exists")
    api.set_defaults(func=cmd_secret_api_key)
    return secret


def _write(out: Path, write: Callable[[], Path], exists: str = "pass --force to replace it") -> Path:
    """Run `write` (a private file at `out`); every way it can fail becomes one UserError line."""
    try:
        return write()
    except FileExistsError:
        raise UserError(f"{out} exists; {exists}") from None
    except UnsafePathError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def how_to_share(where: str, key: ClusterKey) -> str:
    """What to do with a new key: give it to every member."""
    return f"""\
A new cluster key ({where}; id {key.fingerprint}). Whoever holds it is a member of the cluster: keep it
secret. Give it to every node and coordinator, for example:

  scp cluster.key pi@board1:cluster.key                      # copy the file to each machine
  edgeshard node --cluster-key-file cluster.key              # on each board
  edgeshard serve --model smollm2-135m --discover --cluster-key-file cluster.key

or set {ENV_VAR} to the key's text (es1-...) in each one's environment. `edgeshard secret id` prints the
id to compare. To rotate, make a new key and restart every member with it: the old key is then refused."""


def cmd_secret_new(args: argparse.Namespace) -> int:
    """`edgeshard secret new`."""
    key = ClusterKey.generate()
    if args.out is None:
        print(key.text)
        print(
            how_to_share("printed above", key).replace("cluster.key", "FILE")
            + "\nTip: `--out FILE` writes it readable by you only.",
            file=sys.stderr,
        )
        return 0
    path = _write(
        args.out,
        lambda: key.save(args.out, overwrite=args.force),
        "it may hold the key of a running cluster. Pass --force to replace it",
    )
    print(path)
    print(
        how_to_share(f"written to {path}, mode 0600", key).replace("cluster.key", str(path)), file=sys.stderr
    )
    return 0


def cmd_secret_id(args: argparse.Namespace) -> int:
    """`edgeshard secret id`: the fingerprint of the key the flags (or the environment) name."""
    security = security_from_args(args, required=True)
    if not isinstance(security, ClusterKey):
        if not getattr(security, "fingerprint", ""):  # --insecure (or a bundle from before cluster ids)
            raise UserError("--insecure has no key id; pass --cluster-key-file FILE")
        print(security.fingerprint)  # an enrolled node's bundle: the id of the key that enrolled it
        return 0
    print(security.fingerprint)
    return 0


def cmd_secret_api_key(args: argparse.Namespace) -> int:
    """`edgeshard secret api-key`: a random key for the HTTP API."""
    from edgeshard.coordinator.serving.http_security import new_api_key

    key = new_api_key()
    if args.out is None:
        print(key)
        return 0
    path = _write(args.out, lambda: write_private(args.out, key + "\n", overwrite=args.force))
    print(path)
    print(
        f"An API key for the HTTP API (written to {path}, mode 0600). Serve with `edgeshard serve ... "
        f"--api-key-file {path}`; clients send it as `Authorization: Bearer KEY` (the openai client's api_key, "
        "`edgeshard chat --api-key`, EDGESHARD_API_KEY).",
        file=sys.stderr,
    )
    return 0


def cmd_secret_rotate(args: argparse.Namespace) -> int:
    """`edgeshard secret rotate`: a new key, and the three steps of a rotation with overlap."""
    current = security_from_args(args, required=True)
    if not isinstance(current, ClusterKey):
        raise UserError("--insecure has no key to rotate; pass --cluster-key-file FILE")
    files = getattr(args, "cluster_key_file", None) or []
    old = str(files[0]) if files else "old.key"
    nxt = ClusterKey.generate()
    path = _write(args.out, lambda: nxt.save(args.out), "name another file for the next key")
    print(path)
    print(
        f"""\
The next cluster key (id {nxt.fingerprint}) is in {path}; the current one is {current.fingerprint}. Copy it to
every machine, then restart the members one at a time (nothing is refused at any step):

  1. every node:        --cluster-key-file {old} --cluster-key-file {path}
  2. every coordinator: --cluster-key-file {path} --cluster-key-file {old}
  3. every node:        --cluster-key-file {path} --cluster-key-file {old}
  then every member:    --cluster-key-file {path}   (the old key is refused from then on)""",
        file=sys.stderr,
    )
    return 0


def _ca_holder(args: argparse.Namespace, what: str) -> ClusterKey:
    """The cluster key (the CA) the flags name: enrolling and revoking need it, an enrolled node cannot."""
    security = security_from_args(args, required=True)
    if not isinstance(security, ClusterKey):
        raise UserError(
            f"{what} needs the cluster key (it holds the cluster CA): pass --cluster-key-file FILE"
        )
    return (
        security  # (during a rotation: the primary key's CA signs; enrolled nodes trust every accepted one)
    )


def cmd_secret_enrol(args: argparse.Namespace) -> int:
    """`edgeshard secret enrol NAME --out FILE`: a node's own key pair and certificate."""
    from edgeshard.node.security.credentials import issue

    key = _ca_holder(args, "enrolling a node")
    creds = issue(key, args.name)
    path = _write(args.out, lambda: creds.save(args.out, overwrite=args.force))
    print(path)
    print(
        f"""\
Credentials of node {creds.name} (certificate {creds.cert.serial_number:x}, cluster id {key.fingerprint}) are in
{path}, mode 0600. They hold the node's private key: copy them to that board only, then

  edgeshard node --name {creds.name} --credentials {path.name}

and delete the cluster key from the board. A stolen board then yields only these credentials, which
`edgeshard secret revoke {creds.name} --cluster-key-file ...` withdraws from every member.""",
        file=sys.stderr,
    )
    return 0


def cmd_secret_revoke(args: argparse.Namespace) -> int:
    """`edgeshard secret revoke NAME`: add NAME to the signed revocation list, save it, push it to --peers."""
    import asyncio

    from edgeshard.coordinator.discovery.members import parse_peers
    from edgeshard.node.security.credentials import (
        RevocationStore,
        ca_certificates,
        check_name,
        default_revocation_file,
    )

    key = _ca_holder(args, "revoking a node")
    try:
        check_name(args.name)
        peers = parse_peers(args.peers) if args.peers else []
    except ValueError as e:
        raise UserError(str(e)) from None
    path = (args.revocation_file or default_revocation_file()).expanduser()
    store = RevocationStore(path, ca_certificates(key))
    try:
        new = store.current.with_revoked(key, args.name)
        store.save(new)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    print(path)
    print(
        f"revoked {args.name} (revocation list {new.seq}, {len(new.revoked)} name(s)), written to {path}",
        file=sys.stderr,
    )
    if not peers:
        print(
            "Push it to the nodes with --peers host:port,...; coordinators on this machine push it to every "
            "member they confirm (`run`, `serve`, `nodes`). Members refuse the node once they hold it.",
            file=sys.stderr,
        )
        return 0
    results = asyncio.run(_push(peers, key, new.to_bytes()))
    failed = 0
    for peer, (ok, text) in zip(peers, results, strict=True):
        failed += not ok
        print(f"  {peer}: {text}", file=sys.stderr)
    if failed:
        print(
            f"edgeshard: warning: {failed} of {len(peers)} nodes did not take the list; they learn it when a "
            "coordinator holding it confirms them, or push again",
            file=sys.stderr,
        )
    return 1 if failed else 0


async def _push(peers: list[str], key: ClusterKey, data: bytes) -> list[tuple[bool, str]]:
    import asyncio

    import grpc

    from edgeshard.node.security.channels import channel
    from edgeshard.node.wire import edgeshard_pb2 as pb
    from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc

    async def one(peer: str) -> tuple[bool, str]:
        try:
            async with channel(peer, key) as ch:
                reply = await pb_grpc.NodeStub(ch).PushRevocations(
                    pb.CredsRevocations(signed_list=data), timeout=10
                )
        except grpc.aio.AioRpcError as e:
            return False, f"not reached ({e.code().name}: {(e.details() or '').splitlines()[0][:120]})"
        if reply.accepted:
            return True, f"took list {reply.seq}"
        if "not newer" in reply.reason:
            return True, f"already holds list {reply.seq}"
        return False, f"refused it: {reply.reason}"

    return list(await asyncio.gather(*(one(p) for p in peers)))
