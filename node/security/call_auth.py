"""Per-call membership tokens: every gRPC call carries an HMAC that only holders of the cluster key can make.

    authorization: ES1-HMAC <unix ms>.<nonce>.<mac>      mac = HMAC-SHA256(auth key, method, time, nonce)

TLS (node/security/channels.py) already encrypts the call and proves the *node* is a member; the token proves the
*caller* is one. TLS alone cannot: the cluster's server certificate is public (any client receives it in the
handshake), so a stranger can pin it and complete a handshake. Such a caller reaches the node's interceptor
with no token or a wrong one, and is answered UNAUTHENTICATED before any handler or message parser runs; the
node logs the refusal with the caller's address (rate limited, so a flood cannot fill the disk).

The token binds the method (a token for Health cannot open a Forward stream), is fresh (clocks within
`WINDOW_S`) and single-use (a nonce cache over the window), so a token seen anywhere cannot be replayed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict

import grpc

from edgeshard.node.security.credentials import CERT_HEADER, KEY_HOLDER, CallSigner, Identity, Trust
from edgeshard.node.security.credentials import TOKEN_HEADER as CERT_TOKEN_HEADER

log = logging.getLogger("edgeshard.node.auth")

HEADER = "authorization"
SCHEME = "ES1-HMAC"
WINDOW_S = 300.0  # a token older or newer than this is refused (members' clocks must agree this well: NTP)
MAX_NONCES = 200_000  # valid tokens remembered for the window; only members can add to it
LOG_EVERY_S = 60.0  # one log line per peer and reason per this many seconds
BUSY = "too many calls in the replay window; retry in a moment"  # answered RESOURCE_EXHAUSTED
# The token's exact grammar, ASCII only: `str.isdigit` (and `int`) accept non-ASCII digits such as '²', which
# let a stranger raise inside the interceptor (UNKNOWN plus a traceback per call) before this was strict.
TOKEN_RE = re.compile(rf"{SCHEME} ([0-9]{{1,16}})\.([A-Za-z0-9_-]{{1,64}})\.([A-Za-z0-9_-]{{43}})", re.ASCII)


def _mac(key: bytes, method: str, ms: int, nonce: str) -> str:
    msg = f"edgeshard-call-v1\n{method}\n{ms}\n{nonce}".encode()
    return base64.urlsafe_b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode().rstrip("=")


def make_token(key: bytes, method: str, now: float | None = None) -> str:
    """The `authorization` value for a call of `method` (`/edgeshard.v1.Node/Forward`)."""
    ms = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_urlsafe(12)
    return f"{SCHEME} {ms}.{nonce}.{_mac(key, method, ms, nonce)}"


class TokenVerifier:
    """Checks tokens for one cluster key: MAC, freshness, single use."""

    def __init__(
        self,
        key: bytes | None,
        window_s: float = WINDOW_S,
        max_nonces: int = MAX_NONCES,
        also: tuple[bytes, ...] = (),
        trust: Trust | None = None,
    ) -> None:
        self.key = key  # None: an enrolled node (no cluster key), which takes signed tokens only
        self.keys = (key, *also) if key is not None else ()  # `also`: keys still accepted during a rotation
        self.trust = trust  # CA certificates + revocation list: checks signed tokens (credentials.py)
        self.identity: Identity | None = None  # the certificate of the last call admitted by a signed token
        self.window_s = window_s
        self.max_nonces = max_nonces
        self.seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it expires (insertion order)

    def check(self, method: str, token: str | None, now: float | None = None) -> str | None:
        """None when `token` admits a call of `method`, else why not (said to the caller and logged).

        Only members can get past the MAC check, so what comes after it (the nonce cache) grows with
        members' calls alone."""
        if not token:
            return "no cluster credentials"
        match = TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
        if match is None:  # anything else, non-ASCII or undecodable bytes included, is refused here
            return "malformed cluster credentials"
        ms, nonce, mac = int(match[1]), match[2], match[3]
        if not any(hmac.compare_digest(mac.encode(), _mac(k, method, ms, nonce).encode()) for k in self.keys):
            return "wrong cluster key"
        return self.fresh(ms, nonce, now)

    def check_signed(self, method: str, token: object, cert: object, now: float | None = None) -> str | None:
        """None when a signed token (credentials.py) and its certificate admit a call of `method`, else why
        not. Needs `trust` (the CA certificates and revocation list of this member)."""
        if self.trust is None:
            return "no cluster credentials"
        identity, why, stamp = self.trust.check_token(method, token, cert)
        if why is not None:
            return why
        self.identity = identity  # read by the interceptor right after (no await in between)
        ms, nonce = stamp.split(".", 1)
        return self.fresh(int(ms), "c" + nonce, now)  # (its own nonce space: never equal to an HMAC one)

    def check_metadata(self, method: str, metadata, now: float | None = None) -> str | None:
        """Checks a call's metadata: the HMAC token when this member holds a cluster key and the call has
        one; else the signed token. None when admitted, else why not."""
        token = cert_token = cert = None
        for k, v in metadata:
            if k == HEADER:
                token = v
            elif k == CERT_TOKEN_HEADER:
                cert_token = v
            elif k == CERT_HEADER:
                cert = v
        if token is not None and self.key is not None:
            return self.check(method, token if isinstance(token, (str, bytes)) else None, now)
        if cert_token is not None:
            return self.check_signed(method, cert_token, cert, now)
        if token is not None:  # an HMAC token, but this (enrolled) node holds no cluster key
            return "this node is enrolled (no cluster key): the caller's edgeshard is too old to sign calls"
        return "no cluster credentials"

    def fresh(self, ms: int, nonce: str, now: float | None = None) -> str | None:
        """The time and single-use checks shared by both kinds of token."""
        now = time.time() if now is None else now
        skew = ms / 1000 - now
        if abs(skew) > self.window_s:
            return f"clock skew of {skew:+.0f} s (more than {self.window_s:.0f}); synchronise clocks (NTP)"
        self._expire(now)
        if nonce in self.seen:
            return "replayed cluster credentials"
        if len(self.seen) >= self.max_nonces:
            return BUSY
        self.seen[nonce] = now + 2 * self.window_s  # past that, the timestamp check refuses it anyway
        return None

    def _expire(self, now: float) -> None:
        while self.seen:
            nonce, expires = next(iter(self.seen.items()))
            if expires > now:
                return
            self.seen.popitem(last=False)


class RateLimitedLog:
    """Logs a refusal once per (peer host, reason) and `every` seconds; bounded memory."""

    def __init__(
        self, every: float = LOG_EVERY_S, max_keys: int = 4096, logger: logging.Logger = log
    ) -> None:
        self.every, self.max_keys, self.log = every, max_keys, logger
        self.last: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.suppressed = 0

    def warn(self, peer: str, reason: str, message: str, *args: object) -> None:
        """Log `message % args` unless this peer host logged this reason less than `every` seconds ago."""
        key = (peer.rsplit(":", 1)[0], reason)
        now = time.monotonic()
        if now - self.last.get(key, -1e18) < self.every:
            self.suppressed += 1
            return
        self.last[key] = now
        self.last.move_to_end(key)
        while len(self.last) > self.max_keys:
            self.last.popitem(last=False)
        self.log.warning(message, *args)


class TokenPlugin(grpc.AuthMetadataPlugin):
    """Client side: puts a fresh token on every call of a channel (gRPC calls it per call, in a thread)."""

    def __init__(self, key: bytes | None, signer: CallSigner | None = None) -> None:
        self.key = key  # the cluster key's HMAC key (None: an enrolled member, which has none)
        self.signer = signer  # signs the certificate token every member sends (credentials.py)

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        service = context.service_url.rsplit("/", 1)[-1]  # https://<authority>/edgeshard.v1.Node
        method = f"/{service}/{context.method_name}"
        headers = ((HEADER, make_token(self.key, method)),) if self.key is not None else ()
        if self.signer is not None:
            headers += self.signer.metadata(method)
        callback(headers, None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Server side: refuses calls without a valid token with UNAUTHENTICATED, before any handler runs."""

    def __init__(
        self,
        key: bytes | None,
        node: str = "",
        window_s: float = WINDOW_S,
        also: tuple[bytes, ...] = (),
        trust: Trust | None = None,
    ) -> None:
        quiet_grpc_decode_errors()
        self.verifier = TokenVerifier(key, window_s, also=also, trust=trust)
        self.node = node
        self.logger = RateLimitedLog()
        self.refused = 0  # calls refused since start
        # streaming calls running for enrolled members, so a revocation also ends the ones already open (a
        # Forward stream lives as long as the ring): an event that ends the call -> the caller's certificate
        self.running: dict[asyncio.Event, Identity] = {}
        self.cut = 0  # calls ended by a revocation
        if trust is not None and trust.store is not None:
            trust.store.listeners.append(self.end_revoked)

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        metadata = handler_call_details.invocation_metadata or ()
        method = handler_call_details.method or ""
        self.verifier.identity = None
        try:
            why = self.verifier.check_metadata(method, metadata)
        except Exception:  # never UNKNOWN plus a traceback for what a stranger sends: a typed refusal
            why = "malformed cluster credentials"
        identity = self.verifier.identity
        if why is None:
            handler = await continuation(handler_call_details)
            if identity is None or identity.name == KEY_HOLDER or handler is None:
                return handler  # key holders are not revocable one by one (rotate the key)
            return _tracked(handler, identity, self.running)
        self.refused += 1
        return _refusal(self, method, why)

    def end_revoked(self, revocations) -> None:
        """End the open calls of members the new list revokes (their callers see UNAUTHENTICATED)."""
        for gone, identity in list(self.running.items()):
            if revocations.refuses(identity.name, identity.not_before) and not gone.is_set():
                log.warning("ending a call of %s: revoked", identity.name)
                self.cut += 1
                gone.set()


def _tracked(handler: grpc.RpcMethodHandler, identity: Identity, running: dict) -> grpc.RpcMethodHandler:
    """`handler` (response-streaming: the calls that stay open) ending with UNAUTHENTICATED when `running`'s
    event for it is set. The status is sent from the handler's own coroutine between two replies (never from
    another task while a reply is written: see wire_guard.py); short unary calls are left as they are."""
    if not handler.response_streaming:
        return handler
    field = "stream_stream" if handler.request_streaming else "unary_stream"
    behavior = getattr(handler, field)

    async def streaming(request, context):
        gone = asyncio.Event()
        running[gone] = identity
        replies = behavior(request, context).__aiter__()
        try:
            while True:
                step = asyncio.ensure_future(replies.__anext__())
                stop = asyncio.ensure_future(gone.wait())
                await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # revoked while waiting for the next reply
                    step.cancel()
                    with contextlib.suppress(BaseException):
                        await step
                    await context.abort(
                        grpc.StatusCode.UNAUTHENTICATED,
                        f"node {identity.name} was revoked (`edgeshard secret revoke`): its calls end",
                    )
                stop.cancel()
                try:
                    reply = step.result()
                except StopAsyncIteration:
                    return
                yield reply
        finally:
            running.pop(gone, None)

    return handler._replace(**{field: streaming})


class _DropDecodeErrors(logging.Filter):
    """Drops gRPC's own traceback for a metadata value that is not UTF-8 (`Invalid encoding on ...`): gRPC
    then hands the value on decoded as latin-1, and the interceptor refuses it through the rate-limited log.
    Without this, any stranger could write a full traceback into the node's log per call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Invalid encoding on")


_DECODE_FILTER = _DropDecodeErrors()


def quiet_grpc_decode_errors() -> None:
    """Install `_DropDecodeErrors` on gRPC's logger (idempotent)."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if _DECODE_FILTER not in grpc_log.filters:
        grpc_log.addFilter(_DECODE_FILTER)


def _refusal(interceptor: AuthInterceptor, method: str, why: str) -> grpc.RpcMethodHandler:
    """A handler that logs the caller and aborts UNAUTHENTICATED. Its request is left as raw bytes (no
    deserializer): nothing a stranger sent is parsed."""
    message = (
        f"node {interceptor.node or '?'} refused {method or 'the call'}: {why}. Only members of this "
        "cluster may call it: give the caller the cluster's key (--cluster-key-file / EDGESHARD_CLUSTER_KEY)"
    )

    async def refuse(request, context: grpc.aio.ServicerContext) -> None:
        peer = context.peer() or "unknown peer"
        interceptor.logger.warn(peer, why, "UNAUTHENTICATED %s from %s: %s", method or "?", peer, why)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if why == BUSY else grpc.StatusCode.UNAUTHENTICATED
        await context.abort(code, message)

    # the same kind for every method (the caller's stub does not care which handler kind refuses it)
    return grpc.stream_stream_rpc_method_handler(refuse)
