"""Per-node credentials: the cluster key enrols a board once; the board then holds only its own key pair.

    edgeshard secret enrol board1 --out board1.creds    # on the operator's machine (it holds the cluster key)
    edgeshard node --credentials board1.creds           # on board1, which never sees the cluster key

A credentials bundle (PEM, mode 0600) holds the node's P-256 private key, its certificate - subject
`CN=<name>`, signed by the cluster CA, issued now - and the CA certificate. The CA key is derived from the
cluster key (node/security/cluster_key.py), so **whoever holds the cluster key holds the CA**: the operator's
machine and the coordinators started with `--cluster-key-file`. An enrolled node keeps only the CA's public
certificate, so one stolen SD card yields that board's credentials, not the power to make members.

Every member presents a certificate:

- an enrolled node its own (TLS server certificate, and the certificate its calls are signed with);
- a holder of the cluster key the one certificate every key holder derives (`CN=edgeshard-node`): key
  holders are the operator's side and are not revocable one by one (rotate the key for that).

Calls carry, besides the cluster key's HMAC token when the caller holds the key (call_auth.py), a **signed
token**: `edgeshard-call-cert: ES1-CERT <unix ms>.<nonce>.<sig>` with an ECDSA P-256 signature over the
method, the time and the nonce, and the caller's certificate in `edgeshard-cert`. A node checks the
certificate against the CA(s) it trusts and the revocation list, then the signature; fresh and single-use
like the HMAC token. A key holder's server accepts either token (older members send only the HMAC one);
an enrolled server, which has no HMAC key, only the signed one.

**Revocation** (`edgeshard secret revoke NAME`): a list of (name, time) pairs with a sequence number,
signed with the CA key (Ed25519). A certificate of a revoked name issued at or before the revocation time is
refused everywhere the list is known; a board re-enrolled later under the same name gets a new certificate
and is accepted. Members learn the list from `secret revoke --peers` (the PushRevocations RPC) and from any
coordinator that holds a newer one (it pushes it when it confirms a member); each node keeps it in its state
directory, so it survives restarts. See docs/security.md for the threat model.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from edgeshard.node.security.cluster_key import (
    _NOT_AFTER,
    TLS_NAME,
    ClusterKey,
    ClusterKeyError,
    TlsMaterial,
    member_extensions,
)
from edgeshard.node.security.files import write_private

log = logging.getLogger("edgeshard.security")

CERT_HEADER = "edgeshard-cert"  # the caller's certificate (DER, base64url)
TOKEN_HEADER = "edgeshard-call-cert"  # the signed token
SCHEME = "ES1-CERT"
TOKEN_RE = re.compile(rf"{SCHEME} ([0-9]{{1,16}})\.([A-Za-z0-9_-]{{1,64}})\.([A-Za-z0-9_-]{{86}})", re.ASCII)
CERT_RE = re.compile(r"[A-Za-z0-9_-]{16,4096}", re.ASCII)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", re.ASCII)
KEY_HOLDER = TLS_NAME  # the common name of the certificate every holder of the cluster key derives
ISSUE_SKEW_S = 300  # certificates are valid from this long before their issue (clocks of the members differ)
MAX_REVOKED = 10_000
MAX_CACHED_CERTS = 1024
CREDENTIALS_ENV = "EDGESHARD_CREDENTIALS"
REVOCATIONS_ENV = "EDGESHARD_REVOCATIONS"
BUNDLE_HEADER = "# edgeshard node credentials"


def default_revocation_file() -> Path:
    """$EDGESHARD_REVOCATIONS, else revocations.json in the state directory ($XDG_STATE_HOME/edgeshard)."""
    if os.environ.get(REVOCATIONS_ENV):
        return Path(os.environ[REVOCATIONS_ENV]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "edgeshard" / "revocations.json"


def check_name(name: str) -> str:
    """A node name a certificate may carry: 1-64 ASCII letters, digits and `._:-` (not the key holders')."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise ClusterKeyError(
            f"node name {name!r}: use 1-64 ASCII letters, digits, '.', '_', ':' or '-' (starting with a letter "
            "or digit)"
        )
    if name == KEY_HOLDER:
        raise ClusterKeyError(f"{KEY_HOLDER!r} names the holders of the cluster key; pick another node name")
    return name


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---- the CA (only where the cluster key is) -------------------------------------------------------------------
def ca_private_key(key: ClusterKey):
    """The cluster CA's Ed25519 key (derived from the cluster key, as cluster_key.py does)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.from_private_bytes(key.derive("ca"))


def _cert(pem_or_der: bytes):
    from cryptography import x509

    if pem_or_der.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificate(pem_or_der)
    return x509.load_der_x509_certificate(pem_or_der)


def issue(key: ClusterKey, name: str, now: float | None = None) -> NodeCredentials:
    """Enrol node `name`: a new P-256 key pair and a certificate for it signed by the cluster CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    check_name(name)
    primary = key.keys[0]  # during a rotation: signed by the primary key's CA, trusting every accepted one
    ca_cert = _ca_of(primary)
    node_key = ec.generate_private_key(ec.SECP256R1())
    issued = datetime.datetime.fromtimestamp(int(time.time() if now is None else now), datetime.timezone.utc)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = member_extensions(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - datetime.timedelta(seconds=ISSUE_SKEW_S))
        .not_valid_after(_NOT_AFTER),
        ski,  # the extensions of the key holders' certificate: the name members dial, signing, both uses
    ).sign(ca_private_key(primary), None)
    return NodeCredentials(node_key, cert, ca_certificates(key), primary.fingerprint)


# ---- a node's credentials -------------------------------------------------------------------------------------
class NodeCredentials:
    """One node's key pair, its certificate and the CA certificate(s) it trusts. Plays the part a ClusterKey
    plays in channels.py (`tls`, `keys`, `fingerprint`), without the CA key or the HMAC keys."""

    def __init__(self, private_key, cert, ca_certs: tuple, cluster_id: str = "") -> None:
        self.private_key = private_key
        self.cert = cert
        self.ca_certs = tuple(ca_certs)
        self.cluster_id = cluster_id
        self.accepted: tuple = ()

    @property
    def name(self) -> str:
        """The node name the certificate was issued to."""
        from cryptography.x509.oid import NameOID

        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    @property
    def keys(self) -> tuple[NodeCredentials, ...]:
        return (self,)

    @property
    def fingerprint(self) -> str:
        """The cluster's public id (the key's fingerprint, recorded at enrolment)."""
        return self.cluster_id

    def __repr__(self) -> str:
        return f"NodeCredentials(name={self.name}, serial={self.cert.serial_number:x}, cluster={self.cluster_id})"

    @cached_property
    def tls(self) -> TlsMaterial:
        from cryptography.hazmat.primitives import serialization

        pem = serialization.Encoding.PEM
        return TlsMaterial(
            ca_pem=b"".join(c.public_bytes(pem) for c in self.ca_certs),
            cert_pem=self.cert.public_bytes(pem),
            key_pem=self.private_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )

    def bundle(self) -> str:
        """The text of a credentials file: a comment line, the private key, the certificate, the CA(s)."""
        tls = self.tls
        head = f"{BUNDLE_HEADER}: name={self.name} cluster={self.cluster_id}\n"
        return head + (tls.key_pem + tls.cert_pem + tls.ca_pem).decode()

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the bundle mode 0600 (files.write_private)."""
        return write_private(path, self.bundle(), overwrite=overwrite)

    @classmethod
    def parse(cls, text: str) -> NodeCredentials:
        """A bundle as `bundle()` writes it; ClusterKeyError saying what is wrong otherwise."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        cluster_id = ""
        match = re.search(r"cluster=([0-9a-f]{12})", text.split("\n", 1)[0])
        if match:
            cluster_id = match[1]
        try:
            key_pem = re.search(r"-----BEGIN PRIVATE KEY-----.*?-----END PRIVATE KEY-----", text, re.S)
            if key_pem is None:
                raise ValueError("no private key")
            private_key = serialization.load_pem_private_key(key_pem[0].encode(), None)
            certs = x509.load_pem_x509_certificates(text.encode())
        except ValueError as e:
            raise ClusterKeyError(
                f"not an edgeshard credentials file ({e}); make one with `secret enrol`"
            ) from None
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or len(certs) < 2:
            raise ClusterKeyError(
                "not an edgeshard credentials file (a P-256 key, its certificate and the CA)"
            )
        creds = cls(private_key, certs[0], tuple(certs[1:]), cluster_id)
        if certs[0].public_key().public_numbers() != private_key.public_key().public_numbers():
            raise ClusterKeyError("the credentials file's key and certificate do not belong together")
        if Trust(creds.ca_certs).verify_certificate(certs[0].public_bytes(_der())) is None:
            raise ClusterKeyError("the credentials file's certificate is not signed by its CA")
        return creds

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeCredentials:
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ClusterKeyError(
                f"cannot read the credentials file {p}: {getattr(e, 'strerror', e)}"
            ) from None
        try:
            return cls.parse(text)
        except ClusterKeyError as e:
            raise ClusterKeyError(f"{p}: {e}") from None


def _der():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER


# ---- signed call tokens ---------------------------------------------------------------------------------------
def _message(method: str, ms: int, nonce: str) -> bytes:
    return f"edgeshard-call-cert-v1\n{method}\n{ms}\n{nonce}".encode()


class CallSigner:
    """Signs call tokens (and GetInfo challenges) with one member's key; carries its certificate."""

    def __init__(self, private_key, cert) -> None:
        self.private_key = private_key
        self.cert_der = cert.public_bytes(_der())
        self.cert_value = _b64(self.cert_der)

    def _sign(self, data: bytes) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        r, s = decode_dss_signature(self.private_key.sign(data, ec.ECDSA(hashes.SHA256())))
        return _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def token(self, method: str, now: float | None = None) -> str:
        """The `edgeshard-call-cert` value for a call of `method`."""
        ms = int((time.time() if now is None else now) * 1000)
        nonce = secrets.token_urlsafe(12)
        return f"{SCHEME} {ms}.{nonce}.{self._sign(_message(method, ms, nonce))}"

    def metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_HEADER, self.token(method)), (CERT_HEADER, self.cert_value))

    def sign_challenge(self, challenge: bytes) -> bytes:
        """GetInfo's proof that this node holds the key of the certificate it reports."""
        return _unb64(self._sign(b"edgeshard-getinfo-v1\n" + challenge))


@lru_cache(maxsize=8)
def _key_holder_signer(key: ClusterKey) -> CallSigner:
    from cryptography.hazmat.primitives import serialization

    tls = key.tls
    return CallSigner(serialization.load_pem_private_key(tls.key_pem, None), _cert(tls.cert_pem))


def signer_for(security) -> CallSigner:
    """The signer of a member: an enrolled node's own key, or the key holders' derived one."""
    if isinstance(security, NodeCredentials):
        return CallSigner(security.private_key, security.cert)
    return _key_holder_signer(security.keys[0])  # the primary key's (what this member presents)


def _verify_p256(public_key, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if len(signature) != 64 or not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    sig = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


# ---- revocation -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RevocationList:
    """Revoked node names, each with the time from which its certificates issued so far are refused."""

    revoked: dict[str, int] = field(default_factory=dict)
    seq: int = 0
    cluster: str = ""
    signature: bytes = b""

    def body(self) -> bytes:
        payload = {
            "v": 1,
            "cluster": self.cluster,
            "seq": self.seq,
            "revoked": dict(sorted(self.revoked.items())),
        }
        return b"edgeshard-revocations-v1\n" + json.dumps(payload, separators=(",", ":")).encode()

    def refuses(self, name: str, not_before: float) -> bool:
        """Is a certificate for `name`, valid from `not_before`, revoked? (issued at or before the revocation)"""
        at = self.revoked.get(name)
        return at is not None and not_before + ISSUE_SKEW_S <= at

    def with_revoked(self, key: ClusterKey, name: str, now: float | None = None) -> RevocationList:
        """This list plus `name`, signed with the CA key derived from `key` (the next sequence number)."""
        check_name(name)
        if len(self.revoked) >= MAX_REVOKED:
            raise ClusterKeyError(
                f"the revocation list holds {MAX_REVOKED} names; rotate the cluster key instead"
            )
        revoked = {**self.revoked, name: int(time.time() if now is None else now)}
        unsigned = RevocationList(revoked, self.seq + 1, key.fingerprint)
        return RevocationList(
            revoked, unsigned.seq, unsigned.cluster, ca_private_key(key).sign(unsigned.body())
        )

    def to_bytes(self) -> bytes:
        payload = {"v": 1, "cluster": self.cluster, "seq": self.seq, "revoked": self.revoked}
        return json.dumps({**payload, "sig": _b64(self.signature)}, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, ca_certs) -> RevocationList:
        """Parse and verify against the CA certificate(s); ClusterKeyError says why a list is refused."""
        from cryptography.exceptions import InvalidSignature

        try:
            raw = json.loads(data.decode("utf-8"))
            if not isinstance(raw, dict) or raw.get("v") != 1:
                raise ValueError("not a version 1 revocation list")
            revoked = raw["revoked"]
            if not isinstance(revoked, dict) or len(revoked) > MAX_REVOKED:
                raise ValueError("bad list of names")
            revoked = {check_name(k): int(v) for k, v in revoked.items()}
            seq, cluster = int(raw["seq"]), str(raw.get("cluster", ""))
            signature = _unb64(str(raw["sig"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, ClusterKeyError) as e:
            raise ClusterKeyError(f"not a valid revocation list ({e})") from None
        out = cls(revoked, seq, cluster, signature)
        for ca in ca_certs:
            try:
                ca.public_key().verify(signature, out.body())
                return out
            except (InvalidSignature, TypeError, ValueError):
                continue
        raise ClusterKeyError(
            "the revocation list is not signed by this cluster's CA (another or a stale key)"
        )


class RevocationStore:
    """The revocation list a process enforces, kept in a file (0600); replaced only by a newer signed one."""

    def __init__(self, path: Path | None, ca_certs) -> None:
        self.path = path
        self.ca_certs = tuple(ca_certs)
        self.current = RevocationList()
        self.lock = threading.Lock()
        self.listeners: list = []  # called with each list taken (the node's interceptor ends revoked calls)
        if path is not None and path.exists():
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ClusterKeyError(f"cannot read the revocation list {path}: {e.strerror}") from None
            try:  # fail closed: a list we cannot read would let revoked nodes back in
                self.current = RevocationList.from_bytes(data, self.ca_certs)
            except ClusterKeyError as e:
                raise ClusterKeyError(f"{path}: {e}; remove it only if you know why it is there") from None

    def offer(self, data: bytes) -> tuple[bool, str]:
        """Take a signed list if it verifies and is newer; (taken, why not or "")."""
        try:
            new = RevocationList.from_bytes(data, self.ca_certs)
        except ClusterKeyError as e:
            return False, str(e)
        with self.lock:
            if new.seq <= self.current.seq:
                return False, f"not newer than the list held (seq {new.seq} <= {self.current.seq})"
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_private(self.path, new.to_bytes().decode(), overwrite=True)
            self.current = new
        log.warning("revocation list %d taken: revoked %s", new.seq, ", ".join(sorted(new.revoked)) or "none")
        for listener in list(self.listeners):
            listener(new)
        return True, ""

    def save(self, new: RevocationList) -> None:
        """Replace the list with `new` (made here with the CA key) and write it."""
        with self.lock:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_private(self.path, new.to_bytes().decode(), overwrite=True)
            self.current = new


# ---- checking a member's certificate --------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """A verified member certificate."""

    name: str
    serial: int
    not_before: float
    public_key: object = field(repr=False)


class Trust:
    """What a member accepts: certificates signed by one of `ca_certs`, not revoked in `store`."""

    def __init__(self, ca_certs, store: RevocationStore | None = None) -> None:
        self.ca_certs = tuple(ca_certs)
        self.store = store
        self.cache: OrderedDict[bytes, Identity] = OrderedDict()  # only verified certificates enter
        self.lock = threading.Lock()

    def verify_certificate(self, der: bytes) -> Identity | None:
        """The identity in a DER certificate signed by one of our CAs (not a CA itself), else None."""
        digest = hashlib.sha256(der).digest()
        with self.lock:
            hit = self.cache.get(digest)
        if hit is not None:
            return hit
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            cert = x509.load_der_x509_certificate(der)
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            if constraints.ca:
                return None
            ca = next((c for c in self.ca_certs if c.subject == cert.issuer), None)
            if ca is None:
                return None
            cert.verify_directly_issued_by(ca)
            name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            identity = Identity(
                str(name), cert.serial_number, cert.not_valid_before_utc.timestamp(), cert.public_key()
            )
        except Exception:  # anything a stranger sends: not a member's certificate
            return None
        with self.lock:
            self.cache[digest] = identity
            while len(self.cache) > MAX_CACHED_CERTS:
                self.cache.popitem(last=False)
        return identity

    def revoked(self, identity: Identity) -> bool:
        return self.store is not None and self.store.current.refuses(identity.name, identity.not_before)

    def check_token(
        self, method: str, token: str, cert_value: str
    ) -> tuple[Identity | None, str | None, str]:
        """(identity, why refused or None, nonce) for a signed token and the certificate sent with it."""
        match = TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
        if match is None or not isinstance(cert_value, str) or CERT_RE.fullmatch(cert_value) is None:
            return None, "malformed cluster credentials", ""
        identity = self.verify_certificate(_unb64(cert_value))
        if identity is None:
            return None, "certificate not of this cluster (another or a stale cluster key)", ""
        if self.revoked(identity):
            return identity, f"node {identity.name} is revoked (`edgeshard secret revoke`)", ""
        ms, nonce, sig = int(match[1]), match[2], match[3]
        if not _verify_p256(identity.public_key, _unb64(sig), _message(method, ms, nonce)):
            return identity, "invalid signature on the cluster credentials", ""
        return identity, None, f"{ms}.{nonce}"

    def check_challenge(
        self, der: bytes, signature: bytes, challenge: bytes
    ) -> tuple[Identity | None, str | None]:
        """GetInfo's answer to our challenge: the node's certificate and its signature over the challenge."""
        identity = self.verify_certificate(der)
        if identity is None:
            return None, "its certificate is not of this cluster"
        if not _verify_p256(identity.public_key, signature, b"edgeshard-getinfo-v1\n" + challenge):
            return identity, "it does not hold the key of the certificate it reports"
        if self.revoked(identity):
            return identity, f"node {identity.name} is revoked (`edgeshard secret revoke`); it is refused"
        return identity, None


def ca_certificates(security) -> tuple:
    """The CA certificates a member trusts: every accepted cluster key's, or an enrolled node's."""
    if isinstance(security, NodeCredentials):
        return security.ca_certs
    return tuple(_ca_of(k) for k in security.keys)


@lru_cache(maxsize=16)
def _ca_of(key: ClusterKey):
    return _cert(key.tls.ca_pem)
