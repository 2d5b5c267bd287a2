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
from edgeshard.node.security.credentials import NodeCredentials, Trust, signer_for

PROOF_KEYS = ("ts", "kid", "mac", "pv", "addrs", "sig")
CERT_CHUNK = (
    240  # an enrolled node's certificate goes in TXT as crt0, crt1, ... (a TXT string holds 255 bytes)
)
MAX_CERT_CHUNKS = 8


def _proof_key(k: str) -> bool:
    return k in PROOF_KEYS or (k.startswith("crt") and k[3:].isdigit())


VERSION = "2"
MAX_AGE_S = 900.0  # adverts older (or newer, clock skew) than this are refused
RESIGN_S = 300.0  # a node re-announces with a fresh timestamp this often


def _text(x: bytes | str | None) -> str:
    return "" if x is None else x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _norm_name(name: str) -> str:
    return name.strip().lower().rstrip(".")  # DNS names compare case-insensitively


def _body(props: Mapping[str, str], port: int, name: str) -> bytes:
    # JSON of the name, port and sorted pairs: unambiguous whatever the values hold
    pairs = sorted((k, v) for k, v in props.items() if k not in ("mac", "sig"))
    return json.dumps([_norm_name(name), port, pairs], separators=(",", ":")).encode()


def _mac(key: ClusterKey, props: Mapping[str, str], port: int, name: str) -> str:
    digest = hmac.new(
        key.mdns_key, b"edgeshard-mdns-v2\n" + _body(props, port, name), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def _signed_why(text: Mapping[str, str], port: int, name: str, trust: Trust | None) -> str | None:
    """An enrolled node's advert (#20): its certificate in crt0.., an ECDSA signature in `sig`."""
    if trust is None:
        return "signed with a node certificate, and this side holds no cluster trust root"
    chunks = []
    for i in range(MAX_CERT_CHUNKS):
        if f"crt{i}" not in text:
            break
        chunks.append(text[f"crt{i}"])
    try:
        der = base64.urlsafe_b64decode("".join(chunks) + "=" * (-len("".join(chunks)) % 4))
        sig = base64.urlsafe_b64decode(text["sig"] + "=" * (-len(text["sig"]) % 4))
    except ValueError:
        return "invalid membership proof (a forged, altered or re-announced advert)"
    identity, why = trust.check_challenge(der, sig, b"mdns\n" + _body(text, port, name))
    if identity is None:
        kid = text.get("kid", "")
        return (
            f"its certificate is not of this cluster (cluster id {kid[:12] or '?'}): another or a stale key"
        )
    if why is not None and "revoked" in why:
        return why
    return None if why is None else "invalid membership proof (a forged, altered or re-announced advert)"


def sign_txt(
    props: Mapping[str, str],
    port: int,
    key: ClusterKey | NodeCredentials,
    now: float | None = None,
    name: str = "",
    addresses: Iterable[str] = (),
) -> dict[str, str]:
    """`props` plus addrs, ts, kid, pv and mac proving that a holder of `key` announced them as instance
    `name` on `port` at `addresses`. An enrolled node (NodeCredentials) has no mDNS key: it puts its
    certificate in crt0, crt1, ... and signs the same content with its own key (`sig`)."""
    out = {k: str(v) for k, v in props.items() if not _proof_key(k)}
    out["addrs"] = ",".join(sorted(set(addresses)))
    out["ts"] = str(int(time.time() if now is None else now))
    out["kid"] = key.fingerprint
    out["pv"] = VERSION
    if isinstance(key, NodeCredentials):
        signer = signer_for(key)
        cert = signer.cert_value
        for i in range(0, len(cert), CERT_CHUNK):
            out[f"crt{i // CERT_CHUNK}"] = cert[i : i + CERT_CHUNK]
        out["sig"] = base64.urlsafe_b64encode(signer.sign_challenge(b"mdns\n" + _body(out, port, name)))
        out["sig"] = out["sig"].decode().rstrip("=")
        return out
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
    key: ClusterKey | NodeCredentials,
    now: float | None = None,
    max_age: float = MAX_AGE_S,
    name: str = "",
    addresses: Iterable[str] | None = None,
    trust: Trust | None = None,
) -> str | None:
    """None when the TXT properties (as zeroconf parsed them: bytes or str) carry a valid, fresh proof for
    `key`, instance `name` and `port`, and (when given) the resolved `addresses` include one it signed; else
    why the advert is not a member's. An enrolled node's advert (a certificate and `sig`) is checked against
    `trust`: the CA certificates and the revocation list."""
    text = {_text(k): _text(v) for k, v in props.items() if k is not None}
    mac = text.get("mac", "")
    if "sig" in text and not mac:
        why = _signed_why(text, port, name, trust)
        return why if why is not None else _fresh_and_here(text, now, max_age, addresses)
    if not mac:
        return "no membership proof (an --insecure node, an older edgeshard, or not an edgeshard node)"
    if not isinstance(key, ClusterKey):
        return "signed with the cluster key, which this side does not hold (it is enrolled)"
    if not hmac.compare_digest(mac.encode(), _mac(key, text, port, name).encode()):
        kid = text.get("kid", "")
        if kid and kid != key.fingerprint:
            return f"signed with another cluster key (id {kid[:12]}, ours {key.fingerprint}): a stale or other key"
        if text.get("pv", "1") != VERSION:
            return "an older edgeshard's proof (it does not cover the name and addresses): upgrade the node"
        return "invalid membership proof (a forged, altered or re-announced advert)"
    return _fresh_and_here(text, now, max_age, addresses)


def _fresh_and_here(
    text: Mapping[str, str], now: float | None, max_age: float, addresses: Iterable[str] | None
) -> str | None:
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


def verify_any(props: Mapping, port: int, key: ClusterKey | NodeCredentials, **kw) -> str | None:
    """`verify_txt` with the primary key, then each key still accepted (a rotation's overlap); None when one
    of them verifies, else the primary's reason."""
    first = verify_txt(props, port, key.keys[0], **kw)
    if first is None or not key.accepted:
        return first
    return None if any(verify_txt(props, port, k, **kw) is None for k in key.accepted) else first
