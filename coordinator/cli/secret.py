"""The `secret` subcommand: cluster keys.

edgeshard secret new --out cluster.key     # a new cluster key, written readable by you only
edgeshard secret id --cluster-key-file cluster.key   # its public id: compare it across machines
edgeshard secret api-key --out api.key     # a key for the HTTP API (serve --api-key-file api.key)
edgeshard secret rotate --cluster-key-file cluster.key --out next.key   # the next key + the steps

Every command that talks to nodes takes `--cluster-key-file`/`--insecure` (main.py's table says which; `node`
has its own; `cluster` and `demo` make an ephemeral key for the nodes they start). See docs/security.md.
"""

from __future__ import annotations

import argparse
import sys
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
    api = ssub.add_parser("api-key", help="make a random API key for the HTTP API (serve --api-key-file)")
    api.add_argument("--out", type=Path, default=None, help="write it to FILE (mode 0600) instead of stdout")
    api.add_argument("--force", action="store_true", help="replace FILE if it exists")
    api.set_defaults(func=cmd_secret_api_key)
    return secret


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
    try:
        path = key.save(args.out, overwrite=args.force)
    except FileExistsError:
        raise UserError(
            f"{args.out} exists; it may hold the key of a running cluster. Pass --force to replace it"
        ) from None
    except UnsafePathError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot write {args.out}: {e.strerror}") from None
    print(path)
    print(
        how_to_share(f"written to {path}, mode 0600", key).replace("cluster.key", str(path)), file=sys.stderr
    )
    return 0


def cmd_secret_id(args: argparse.Namespace) -> int:
    """`edgeshard secret id`: the fingerprint of the key the flags (or the environment) name."""
    security = security_from_args(args, required=True)
    if not isinstance(security, ClusterKey):
        raise UserError("--insecure has no key id; pass --cluster-key-file FILE")
    print(security.fingerprint)
    return 0


def cmd_secret_api_key(args: argparse.Namespace) -> int:
    """`edgeshard secret api-key`: a random key for the HTTP API."""
    from edgeshard.coordinator.serving.http_security import new_api_key

    key = new_api_key()
    if args.out is None:
        print(key)
        return 0
    try:
        path = write_private(args.out, key + "\n", overwrite=args.force)
    except FileExistsError:
        raise UserError(f"{args.out} exists; pass --force to replace it") from None
    except UnsafePathError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot write {args.out}: {e.strerror}") from None
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
    try:
        path = nxt.save(args.out)
    except FileExistsError:
        raise UserError(f"{args.out} exists; name another file for the next key") from None
    except (UnsafePathError, OSError) as e:
        raise UserError(f"cannot write {args.out}: {getattr(e, 'strerror', None) or e}") from None
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
