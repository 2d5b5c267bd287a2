"""Membership proof in mDNS adverts: an HMAC over the whole advert, so coordinators ignore strangers unseen.

    TXT  ... addrs=<the node's addresses> ts=<unix s> kid=<key id> pv=2 mac=<base64url HMAC-SHA256, 128 bits>

mDNS is unauthenticated: anyone on the LAN can announce `_edgeshard._tcp.local.`, answer for a member's
name, or send a goodbye for it. A member signs, with the cluster's mDNS key (derived from the cluster key):
its instance name, its SRV port, its addresses (also listed in TXT as `addrs`) and every TXT property. A
coordinator checks the proof before it dials anything, so

- a stranger's advert (no proof, another key, altered) costs it no connection;
- a member's advert copied off the air and re-announced under another name, port or address fails the MAC
  (or names none of the addresses it signed) and is ignored - it cannot replace the member in the table;
- replay of an old advert is bounded by the timestamp: older (or newer, clock skew) than `MAX_AGE_S` is
  refused, and a coordinator never accepts an advert older than the last one it accepted for that name.

Version 1 (before #20) covered only the TXT properties and the port; its adverts are refused with a message
saying the node runs an older edgeshard. `kid` names the key (its public fingerprint) so a stale key can be
told from a stranger. Goodbyes cannot be signed (an mDNS goodbye is the record with TTL 0); the coordinator
treats one as a hint and removes a member only when it then stops answering (coordinator/discovery/mdns.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping

from edgeshard.node.security.cluster_key import ClusterKey

PROOF_KEYS = ("ts", "kid", "mac", "pv", "addrs")
VERSION = "2"
MAX_AGE_S = 900.0  # adverts older (or newer, clock skew) than this are refused
RESIGN_S = 300.0  # a node re-announces with a fresh timestamp this often


def _text(x: bytes | str | None) -> str:
    return "" if x is None else x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _norm_name(name: str) -> str:
    return name.strip().lower().rstrip(".")  # DNS names compare case-insensitively


def _mac(key: ClusterKey, props: Mapping[str, str], port: int, name: str) -> str:
    # JSON of the name, port and sorted pairs: unambiguous whatever the values hold
    pairs = sorted((k, v) for k, v in props.items() if k != "mac")
    body = json.dumps([_norm_name(name), port, pairs], separators=(",", ":"))
    digest = hmac.new(key.mdns_key, b"edgeshard-mdns-v2\n" + body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def sign_txt(
    props: Mapping[str, str],
    port: int,
    key: ClusterKey,
    now: float | None = None,
    name: str = "",
    addresses: Iterable[str] = (),
) -> dict[str, str]:
    """`props` plus addrs, ts, kid, pv and mac proving that a holder of `key` announced them as instance
    `name` on `port` at `addresses`."""
    out = {k: str(v) for k, v in props.items() if k not in PROOF_KEYS}
    out["addrs"] = ",".join(sorted(set(addresses)))
    out["ts"] = str(int(time.time() if now is None else now))
    out["kid"] = key.fingerprint
    out["pv"] = VERSION
    out["mac"] = _mac(key, out, port, name)
    return out


def signed_addresses(props: Mapping) -> list[str]:
    """The addresses a (verified) advert signed."""
    text = {_text(k): _text(v) for k, v in props.items() if k is not None}
    return [a for a in text.get("addrs", "").split(",") if a]


def proof_time(props: Mapping) -> int:
    """The advert's signed timestamp (0 when absent or malformed)."""
    ts = next((_text(v) for k, v in props.items() if _text(k) == "ts"), "")
    return int(ts) if ts.isascii() and ts.isdigit() and len(ts) < 16 else 0


def verify_txt(
    props: Mapping,
    port: int,
    key: ClusterKey,
    now: float | None = None,
    max_age: float = MAX_AGE_S,
    name: str = "",
    addresses: Iterable[str] | None = None,
) -> str | None:
    """None when the TXT properties (as zeroconf parsed them: bytes or str) carry a valid, fresh proof for
    `key`, instance `name` and `port`, and (when given) the resolved `addresses` include one it signed; else
    why the advert is not a member's."""
    text = {_text(k): _text(v) for k, v in props.items() if k is not None}
    mac = text.get("mac", "")
    if not mac:
        return "no membership proof (an --insecure node, an older edgeshard, or not an edgeshard node)"
    if not hmac.compare_digest(mac.encode(), _mac(key, text, port, name).encode()):
        kid = text.get("kid", "")
        if kid and kid != key.fingerprint:
            return f"signed with another cluster key (id {kid[:12]}, ours {key.fingerprint}): a stale or other key"
        if text.get("pv", "1") != VERSION:
            return "an older edgeshard's proof (it does not cover the name and addresses): upgrade the node"
        return "invalid membership proof (a forged, altered or re-announced advert)"
    ts = proof_time(text)
    age = (time.time() if now is None else now) - ts if ts else float("inf")
    if abs(age) > max_age:
        return f"membership proof is {age:.0f} s old: a replayed advert, or the node's clock is off (NTP)"
    if addresses is not None:
        signed = set(signed_addresses(text))
        if not signed & set(addresses):
            shown = ", ".join(sorted(set(addresses))) or "none"
            return f"it resolves to {shown}, none of the addresses it signed (a re-addressed replay?)"
    return None


def verify_any(props: Mapping, port: int, key: ClusterKey, **kw) -> str | None:
    """`verify_txt` with the primary key, then each key still accepted (a rotation's overlap); None when one
    of them verifies, else the primary's reason."""
    first = verify_txt(props, port, key.keys[0], **kw)
    if first is None or not key.accepted:
        return first
    return None if any(verify_txt(props, port, k, **kw) is None for k in key.accepted) else first
