"""Membership proof in mDNS adverts: an HMAC over the TXT record, so coordinators ignore strangers unseen.

    TXT  ... ts=<unix s> kid=<key id> mac=<base64url HMAC-SHA256, 128 bits>

mDNS is unauthenticated: anyone on the LAN can announce `_edgeshard._tcp.local.`. A member signs its TXT
properties and SRV port with the cluster's mDNS key (derived from the cluster key); a coordinator checks the
proof before it dials anything, so a stranger's or impostor's advert costs it no connection. The timestamp
limits replay of a member's advert copied off the air to `MAX_AGE_S` (the node re-signs every `RESIGN_S`).
A replayed advert pointing elsewhere gains nothing anyway: the TLS handshake to the address it names fails
without the key. `kid` names the key (its public fingerprint) so a stale key can be told from a stranger.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping

from edgeshard.node.security.cluster_key import ClusterKey

PROOF_KEYS = ("ts", "kid", "mac")
MAX_AGE_S = 900.0  # adverts older (or newer, clock skew) than this are refused
RESIGN_S = 300.0  # a node re-announces with a fresh timestamp this often


def _text(x: bytes | str | None) -> str:
    return "" if x is None else x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _mac(key: ClusterKey, props: Mapping[str, str], port: int) -> str:
    # JSON of the sorted pairs: unambiguous whatever the values hold (names may contain any character)
    body = json.dumps([port, sorted((k, v) for k, v in props.items() if k != "mac")], separators=(",", ":"))
    digest = hmac.new(key.mdns_key, b"edgeshard-mdns-v1\n" + body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def sign_txt(
    props: Mapping[str, str], port: int, key: ClusterKey, now: float | None = None
) -> dict[str, str]:
    """`props` plus ts, kid and mac proving that a holder of `key` announced them for `port`."""
    out = {k: str(v) for k, v in props.items() if k not in PROOF_KEYS}
    out["ts"] = str(int(time.time() if now is None else now))
    out["kid"] = key.fingerprint
    out["mac"] = _mac(key, out, port)
    return out


def verify_txt(
    props: Mapping, port: int, key: ClusterKey, now: float | None = None, max_age: float = MAX_AGE_S
) -> str | None:
    """None when the TXT properties (as zeroconf parsed them: bytes or str) carry a valid, fresh proof for
    `key`; else why the advert is not a member's."""
    text = {_text(k): _text(v) for k, v in props.items() if k is not None}
    mac = text.get("mac", "")
    if not mac:
        return "no membership proof (an --insecure node, an older edgeshard, or not an edgeshard node)"
    if not hmac.compare_digest(mac.encode(), _mac(key, text, port).encode()):
        kid = text.get("kid", "")
        if kid and kid != key.fingerprint:
            return f"signed with another cluster key (id {kid[:12]}, ours {key.fingerprint}): a stale or other key"
        return "invalid membership proof (a forged or altered advert)"
    ts = text.get("ts", "")
    age = (time.time() if now is None else now) - int(ts) if ts.isdigit() and len(ts) < 16 else float("inf")
    if abs(age) > max_age:
        return f"membership proof is {age:.0f} s old: a replayed advert, or the node's clock is off (NTP)"
    return None
