"""The cluster key: one shared secret from which every member derives the cluster's keys and TLS identity.

    es1-<43 characters of base64url>        32 random bytes; `edgeshard secret new` makes one

Everything else is derived from it with HKDF-SHA256 (one `info` label per use), so every member builds the
same material offline and nothing else has to be distributed:

    auth     HMAC key of the per-call tokens (node/security/call_auth.py)
    mdns     HMAC key of the membership proof in mDNS adverts (node/security/advert_proof.py)
    ca       Ed25519 key of the cluster CA: a self-signed certificate, the trust root of every member
    tls      P-256 key of the one server certificate all members present (signed by the CA)
    id       a short public fingerprint, safe to print and compare ("which key does this node hold?")

The certificates are deterministic (Ed25519 signatures are; fixed serials and validity), so two members
derive byte-identical PEM. The CA key is only ever used to sign that one certificate. The server key is
P-256 because gRPC's TLS stack does not offer Ed25519 signatures in the handshake.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from edgeshard.node.errors import EdgeshardError
from edgeshard.node.security.files import write_private

PREFIX = "es1-"
KEY_BYTES = 32
ENV_VAR = "EDGESHARD_CLUSTER_KEY"
TLS_NAME = "edgeshard-node"  # the name in the server certificate; channels override the target name to it
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)

NO_KEY_HELP = (
    "make a cluster key once with `edgeshard secret new --out cluster.key`, copy the file to every machine of "
    f"the cluster, and pass --cluster-key-file cluster.key (or set {ENV_VAR} to its contents) on every node "
    "and coordinator; --insecure runs without one (anyone on the network can then use and read the cluster)"
)


class ClusterKeyError(EdgeshardError, ValueError):
    """No usable cluster key (missing, malformed, unreadable); the message says how to get one."""


@dataclass(frozen=True)
class TlsMaterial:
    """PEM of the cluster CA certificate, the members' server certificate and its private key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


class ClusterKey:
    """A cluster's shared secret and everything derived from it. `str(key)` never shows the secret."""

    def __init__(self, secret: bytes, accepted: tuple[ClusterKey, ...] = ()) -> None:
        if len(secret) != KEY_BYTES:
            raise ClusterKeyError(f"a cluster key holds {KEY_BYTES} bytes, got {len(secret)}")
        self._secret = secret
        # Rotation with overlap: other keys whose members are still accepted (tokens, certificates, adverts),
        # while this one - the primary - is what this process presents and signs with. See docs/security.md.
        self.accepted = tuple(k for k in accepted if k != self)

    def with_accepted(self, *others: ClusterKey) -> ClusterKey:
        """This key as the primary, also accepting `others` (and what they accept) during a rotation."""
        flat = [*self.accepted, *(k for o in others for k in o.keys)]
        return ClusterKey(self._secret, tuple(dict.fromkeys(flat)))

    @property
    def keys(self) -> tuple[ClusterKey, ...]:
        """The primary (this key, alone) and the accepted ones, in that order."""
        return (ClusterKey(self._secret), *self.accepted) if self.accepted else (self,)

    # ---- making, reading, writing -------------------------------------------------------------------------
    @classmethod
    def generate(cls) -> ClusterKey:
        """A new random key (from the OS's CSPRNG)."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def parse(cls, text: str) -> ClusterKey:
        """The key written as `es1-<base64url>` (surrounding whitespace ignored)."""
        text = text.strip()
        if not text.startswith(PREFIX):
            raise ClusterKeyError(f"a cluster key starts with {PREFIX!r}; {NO_KEY_HELP}")
        body = text[len(PREFIX) :]
        try:
            secret = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise ClusterKeyError("the cluster key is not valid base64url; copy it again whole") from None
        if len(secret) != KEY_BYTES or cls(secret).text != text:
            raise ClusterKeyError("the cluster key is truncated or altered; copy it again whole")
        return cls(secret)

    @classmethod
    def parse_many(cls, text: str) -> ClusterKey:
        """One key per line (or comma-separated; `#` comments and blank lines ignored): the first is the
        primary, the others are accepted too (a rotation's overlap)."""
        items = [x.strip() for line in text.splitlines() for x in line.split("#", 1)[0].split(",")]
        keys = [cls.parse(x) for x in items if x]
        if not keys:
            raise ClusterKeyError(f"no cluster key in the text; {NO_KEY_HELP}")
        return keys[0].with_accepted(*keys[1:])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterKey:
        """Read a key file (as `secret new --out` writes it: one key; during a rotation, the primary first
        and then the keys still accepted, one per line); a key readable by others is still used."""
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except OSError as e:
            raise ClusterKeyError(f"cannot read the cluster key file {p}: {e.strerror}") from None
        try:
            return cls.parse_many(text)
        except ClusterKeyError as e:
            raise ClusterKeyError(f"{p}: {e}") from None

    @staticmethod
    def loose_permissions(path: str | os.PathLike[str]) -> bool:
        """True when group or others may read the key file (worth a warning, as ssh does)."""
        try:
            return bool(Path(path).expanduser().stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
        except OSError:
            return False

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the key to `path`, mode 0600 from creation (never through a symlink; files.write_private);
        refuses to replace a file unless told."""
        return write_private(path, "".join(k.text + "\n" for k in self.keys), overwrite=overwrite)

    # ---- what it is -----------------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The key as users copy it: `es1-<base64url>`. Secret: never log it."""
        return PREFIX + base64.urlsafe_b64encode(self._secret).decode().rstrip("=")

    @cached_property
    def fingerprint(self) -> str:
        """12 hex digits naming the key publicly (a one-way derivation: it reveals nothing of the key)."""
        return self.derive("id", 6).hex()

    def __repr__(self) -> str:
        also = f", accepting {', '.join(k.fingerprint for k in self.accepted)}" if self.accepted else ""
        return f"ClusterKey(id={self.fingerprint}{also})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterKey) and secrets.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    # ---- derivations ----------------------------------------------------------------------------------------
    def derive(self, label: str, length: int = 32) -> bytes:
        """HKDF-SHA256 of the key for one purpose; different labels give independent keys."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        hkdf = HKDF(hashes.SHA256(), length, salt=b"edgeshard cluster key v1", info=label.encode())
        return hkdf.derive(self._secret)

    @cached_property
    def auth_key(self) -> bytes:
        """HMAC key of per-call tokens."""
        return self.derive("auth")

    @cached_property
    def mdns_key(self) -> bytes:
        """HMAC key of mDNS membership proofs."""
        return self.derive("mdns")

    @cached_property
    def tls(self) -> TlsMaterial:
        """The cluster CA and the members' server certificate, derived (identically on every member)."""
        return _tls_material(self.derive("ca"), self.derive("tls", 48))


def member_extensions(builder, ca_ski):
    """`builder` (an x509.CertificateBuilder) with the extensions of a member's certificate: the name members
    dial, not a CA, signing (TLS and call tokens), server and client use, issued by the CA of `ca_ski`. The
    key holders' derived certificate and an enrolled node's own (credentials.py) carry the same ones."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False)
    usage.update(key_agreement=False, encipher_only=False, decipher_only=False)
    return (
        builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )


def _tls_material(ca_seed: bytes, tls_seed: bytes) -> TlsMaterial:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    ca_key = ed25519.Ed25519PrivateKey.from_private_bytes(ca_seed)
    # 48 bytes reduced mod (n - 1), + 1: a uniform scalar in [1, n) (the bias of the reduction is < 2^-128)
    scalar = int.from_bytes(tls_seed, "big") % (_P256_ORDER - 1) + 1
    tls_key = ec.derive_private_key(scalar, ec.SECP256R1())
    ca_pub = ca_key.public_key()
    # the CA's name carries its key's hash: CAs of different clusters never share a subject
    tag = hashlib.sha256(ca_pub.public_bytes_raw()).hexdigest()[:16]
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeshard cluster CA {tag}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_pub)
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False)
    usage.update(key_agreement=False, encipher_only=False, decipher_only=False)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_pub)
        .serial_number(int.from_bytes(hashlib.sha256(b"ca" + ca_seed).digest()[:8], "big") | 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage), critical=True
        )
        .add_extension(ski, critical=False)
        .sign(ca_key, None)
    )
    cert = member_extensions(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)]))
        .issuer_name(ca_name)
        .public_key(tls_key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(b"tls" + ca_seed).digest()[:8], "big") | 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER),
        ski,
    ).sign(ca_key, None)
    pem = serialization.Encoding.PEM
    return TlsMaterial(
        ca_pem=ca_cert.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=tls_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
