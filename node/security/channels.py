"""How cluster members talk: TLS with the cluster's derived certificate plus a per-call token, or --insecure.

Every gRPC connection between members (coordinator -> node, node -> next node) is TLS. The server presents
the certificate every member derives from the cluster key (node/security/cluster_key.py), and the client trusts only
the cluster CA derived from the same key: a node without the key cannot serve a handshake, and a client with
another key refuses the node during the handshake. Clients dial nodes by IP, so the TLS name is a fixed one
(`ssl_target_name_override`). On top, every call carries a token (node/security/call_auth.py) that proves the caller
holds the key; the node's interceptor answers UNAUTHENTICATED to anything else and logs the caller.

Which mode a process runs in is decided once, at start: `configure(key)` or `configure(INSECURE)` (the CLI
does it from --cluster-key-file / --insecure), else the EDGESHARD_CLUSTER_KEY environment variable, else
nothing - and then opening a channel fails with `ClusterKeyError` saying how to make a key. Local clusters
(`edgeshard cluster`, `demo`, `LocalCluster`) call `for_local_nodes()`, which makes an ephemeral key for the
nodes they start when none was configured: secure without set-up. See docs/security.md.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from edgeshard.node.security.call_auth import AuthInterceptor, TokenPlugin
from edgeshard.node.security.cluster_key import ENV_VAR, NO_KEY_HELP, TLS_NAME, ClusterKey, ClusterKeyError
from edgeshard.node.security.credentials import (
    CREDENTIALS_ENV,
    NodeCredentials,
    RevocationStore,
    Trust,
    ca_certificates,
    default_revocation_file,
    signer_for,
)
from edgeshard.node.security.wire_guard import DecodeGuard
from edgeshard.node.wire.options import GRPC_OPTIONS

log = logging.getLogger("edgeshard.security")

__all__ = [
    "INSECURE",
    "ClusterKey",
    "ClusterKeyError",
    "Insecure",
    "NodeCredentials",
    "channel",
    "configure",
    "connection_problem",
    "current",
    "for_local_nodes",
    "listen",
    "server_interceptors",
]


class Insecure:
    """The explicit choice to run without a cluster key (`--insecure`): plaintext, no authentication."""

    def __repr__(self) -> str:
        return "INSECURE"


INSECURE = Insecure()
Security = ClusterKey | NodeCredentials | Insecure  # NodeCredentials: an enrolled member (credentials.py)
INSECURE_WARNING = (
    "--insecure: traffic between nodes and coordinators is neither authenticated nor encrypted; anyone on "
    "this network can load shards, send activations and read prompts and answers. Use a cluster key "
    "(`edgeshard secret new`) outside a lab you control."
)

_configured: Security | None = None
_revocations: dict[tuple, RevocationStore] = {}  # (file, CA certificates) -> the store this process enforces
_revocation_file: Path | None = None  # set by a node (its state directory); None: default_revocation_file()


def configure(security: Security | None) -> None:
    """Set this process's mode (None forgets it: the environment decides again)."""
    global _configured
    _configured = security


def use_revocation_file(path: Path | None) -> None:
    """Where this process keeps (and reads) the revocation list; None: the default (credentials.py)."""
    global _revocation_file
    _revocation_file = path


def revocations(security: Security | None = None) -> RevocationStore | None:
    """The revocation list this process enforces for `security` (None: current()); None when insecure.
    Read once per file and trust root; ClusterKeyError when the file is there but not a valid list."""
    sec = current() if security is None else security
    if isinstance(sec, Insecure):
        return None
    path = _revocation_file or default_revocation_file()
    cas = ca_certificates(sec)
    key = (str(path), tuple(c.tbs_certificate_bytes for c in cas))
    store = _revocations.get(key)
    if store is None:
        store = _revocations[key] = RevocationStore(path, cas)
    return store


def trust(security: Security | None = None) -> Trust | None:
    """What this process accepts as a member's certificate (its CAs, minus the revoked); None if insecure."""
    sec = current() if security is None else security
    if isinstance(sec, Insecure):
        return None
    return Trust(ca_certificates(sec), revocations(sec))


def current() -> Security:
    """The configured mode, else a key from $EDGESHARD_CLUSTER_KEY; ClusterKeyError when there is neither."""
    if _configured is not None:
        return _configured
    text = os.environ.get(ENV_VAR, "").strip()
    if text:
        return _from_env(text)
    if os.environ.get(CREDENTIALS_ENV, "").strip():
        return _creds_from_env(os.environ[CREDENTIALS_ENV].strip())
    raise ClusterKeyError(f"no cluster key: {NO_KEY_HELP}")


@functools.lru_cache(maxsize=4)
def _creds_from_env(path: str) -> NodeCredentials:
    return NodeCredentials.load(path)


@functools.lru_cache(maxsize=4)
def _from_env(text: str) -> ClusterKey:
    # one ClusterKey per key text: its derived TLS material is then computed once, not per channel
    return ClusterKey.parse_many(text)


def for_local_nodes() -> Security:
    """The mode for nodes this process starts itself (cluster/demo/LocalCluster): the configured one, or an
    ephemeral key made now (and configured, so this process's channels use it too)."""
    if _configured is not None or os.environ.get(ENV_VAR, "").strip():
        return current()  # (a malformed key in the environment is reported, not papered over)
    key = ClusterKey.generate()
    configure(key)
    log.info("local nodes use an ephemeral cluster key (id %s)", key.fingerprint)
    return key


# ---- channels and servers ---------------------------------------------------------------------------------
def channel(
    address: str, security: Security | None = None, options: Sequence[tuple[str, object]] = ()
) -> grpc.aio.Channel:
    """An aio channel to the node at `address` in the given mode (None: `current()`), with the node's
    message-size and keepalive options (GRPC_OPTIONS) unless `options` overrides them."""

    sec = current() if security is None else security
    merged = dict(GRPC_OPTIONS)
    merged.update(dict(options))
    if isinstance(sec, Insecure):
        return grpc.aio.insecure_channel(address, options=list(merged.items()))
    merged["grpc.ssl_target_name_override"] = TLS_NAME  # nodes are dialled by IP; the certificate names this
    trusted = b"".join(k.tls.ca_pem for k in sec.keys)  # during a rotation: the CAs of every accepted key
    hmac_key = sec.auth_key if isinstance(sec, ClusterKey) else None  # an enrolled member has none
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=trusted),
        grpc.metadata_call_credentials(TokenPlugin(hmac_key, signer_for(sec)), name="edgeshard-call-token"),
    )
    return grpc.aio.secure_channel(address, creds, options=list(merged.items()))


def listen(server: grpc.aio.Server, address: str, security: Security) -> int:
    """Add a listening port to `server` in the given mode; the port number."""
    if isinstance(security, Insecure):
        return server.add_insecure_port(address)
    tls = security.tls
    # no client certificate: callers prove membership with the per-call token, which a stranger who pinned
    # our (public) certificate still lacks - and unlike a failed client-certificate handshake, a refused
    # token is an UNAUTHENTICATED status the caller sees and a line in this node's log
    creds = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)], require_client_auth=False)
    return server.add_secure_port(address, creds)


def server_interceptors(
    security: Security, node: str = "", trusted: Trust | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a node's server needs in this mode: the token check (not when insecure), then the
    parse guard (corrupt requests are INVALID_ARGUMENT, never UNKNOWN plus a traceback). `trusted` (default:
    `trust(security)`) checks signed tokens: the CA certificates and the revocation list."""
    guard = DecodeGuard()
    if isinstance(security, Insecure):
        return [guard]
    trusted = trusted if trusted is not None else trust(security)
    if isinstance(security, NodeCredentials):
        return [AuthInterceptor(None, node, trust=trusted), guard]
    also = tuple(k.auth_key for k in security.accepted)
    return [AuthInterceptor(security.auth_key, node, also=also, trust=trusted), guard]


def connection_problem(details: str | None, security: Security | None = None) -> str | None:
    """What a failed call's gRPC details say about membership (a sentence to add to the error), or None."""
    text = details or ""
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate signature failure" in text:
        return (
            "its TLS certificate is not of this cluster: it holds a different (or stale) cluster key, or is "
            "not an edgeshard node; give every node and coordinator the same key file"
        )
    if "WRONG_VERSION_NUMBER" in text:
        return "it does not speak TLS: it probably runs with --insecure (no cluster key)"
    if "refused /edgeshard." in text and "cluster" in text:
        return "it refused our cluster credentials: it holds a different (or newer) cluster key"
    if isinstance(security, Insecure) and "Socket closed" in text:
        return "if it runs with a cluster key, it closes plaintext connections: give this side the key too"
    return None


# ---- command-line flags -----------------------------------------------------------------------------------
def add_security_args(p: argparse.ArgumentParser) -> None:
    """--cluster-key-file and --insecure (nodes and every coordinator command that talks to nodes)."""
    p.add_argument(
        "--cluster-key-file",
        type=Path,
        action="append",
        default=None,
        metavar="FILE",
        help=f"the cluster key (`edgeshard secret new --out FILE`; default: ${ENV_VAR}). Repeat it during a "
        "key rotation: the first file's key is presented and signed with, the others' are accepted too",
    )
    p.add_argument(
        "--credentials",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"this member's own credentials instead of the cluster key (`edgeshard secret enrol NAME --out "
        f"FILE` on the machine with the key; default: ${CREDENTIALS_ENV}): a stolen board then yields only "
        "its own, revocable credentials",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="run without a cluster key: no authentication, no encryption (a lab you control only)",
    )


def security_from_args(args: argparse.Namespace, required: bool = True) -> Security | None:
    """The mode the flags (or $EDGESHARD_CLUSTER_KEY) ask for; None when neither says and not `required`.

    Raises ClusterKeyError for an unreadable or malformed key, both --insecure and a key, or (when
    `required`) no choice at all.
    """
    key_files = getattr(args, "cluster_key_file", None)
    if isinstance(key_files, str | Path):
        key_files = [key_files]
    insecure = getattr(args, "insecure", False)
    if key_files and insecure:
        raise ClusterKeyError("--insecure and --cluster-key-file contradict each other; choose one")
    creds_file = getattr(args, "credentials", None)
    if creds_file is not None:
        if key_files or insecure:
            other = "--insecure" if insecure else "--cluster-key-file"
            raise ClusterKeyError(f"--credentials and {other} contradict each other; choose one")
        if ClusterKey.loose_permissions(creds_file):
            log.warning("credentials file %s is readable by other users; chmod 600 it", creds_file)
        return NodeCredentials.load(creds_file)
    if key_files:
        keys = []
        for key_file in key_files:
            if ClusterKey.loose_permissions(key_file):
                log.warning("cluster key file %s is readable by other users; chmod 600 it", key_file)
            keys.append(ClusterKey.load(key_file))
        return keys[0].with_accepted(*keys[1:])
    if insecure:
        return INSECURE
    if os.environ.get(ENV_VAR, "").strip():
        return _from_env(os.environ[ENV_VAR].strip())
    if os.environ.get(CREDENTIALS_ENV, "").strip():
        return _creds_from_env(os.environ[CREDENTIALS_ENV].strip())
    if required:
        raise ClusterKeyError(f"no cluster key: {NO_KEY_HELP}")
    return None


def configure_from_args(args: argparse.Namespace, who: str = "edgeshard") -> Security | None:
    """`configure` from the flags when they choose (warning on stderr for --insecure); the choice."""
    security = security_from_args(args, required=False)
    if security is not None:
        configure(security)
    if isinstance(security, Insecure):
        print(f"{who}: warning: {INSECURE_WARNING}", file=sys.stderr)
    return security
