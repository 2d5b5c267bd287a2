"""The gRPC settings every hop shares: message size bounds and keepalive (a tiny module: security and
the coordinator import it without the tensor code).

Keepalive must agree on both ends. Every channel (coordinator -> node, node -> next node) pings its server
every `KEEPALIVE_S` seconds, with or without calls and data in flight, so a dead peer on an idle ring is
noticed before the next token rather than at it. A gRPC server by default accepts a ping without data at
most every 5 minutes and answers the third early one with GOAWAY `too_many_pings`: the stream breaks, and
the next request after ~80 s of idle found a "failed" node and rebuilt a healthy ring. `SERVER_OPTIONS`
therefore lets a node accept pings as often as half the keepalive period, without calls too.

`EDGESHARD_KEEPALIVE_S` (seconds, default 20) changes the period for every process that reads it at start
(tests use a fraction of a second to idle "for hours" in a few seconds); set it the same everywhere.
"""

import os

# Largest gRPC message a node sends or accepts. A prefill chunk of 512 rows of an 8192-wide f32 model is
# 16 MiB; the margin leaves room for larger chunks without letting one message eat a small device's memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

KEEPALIVE_ENV = "EDGESHARD_KEEPALIVE_S"
DEFAULT_KEEPALIVE_S = 20.0


def keepalive_ms(environ=os.environ) -> int:
    """The ping period in ms: $EDGESHARD_KEEPALIVE_S, else 20 s (at least 100 ms)."""
    raw = environ.get(KEEPALIVE_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_KEEPALIVE_S
    except ValueError:
        raise ValueError(f"${KEEPALIVE_ENV} must be a number of seconds, got {raw!r}") from None
    return max(100, int(seconds * 1000))


KEEPALIVE_MS = keepalive_ms()
# an unanswered ping fails the connection after this long (10 s, or the period when that is shorter)
KEEPALIVE_TIMEOUT_MS = min(10_000, max(1_000, KEEPALIVE_MS))

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Hops are long-lived: keepalive notices a dead peer on an idle ring instead of at the next token.
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),  # an idle coordinator's channels stay checked too
    ("grpc.http2.max_pings_without_data", 0),  # an idle stream is pinged for as long as it is open
]

# What a node's server accepts: the pings above, on idle streams and idle connections alike. No strike
# limit: a node busy in a long step (a shard load, a Pi under swap) reads the pings that arrived meanwhile
# back to back, and with strikes counted those looked like abuse and cost the connection (seen with short
# periods in tests; a 20 s period only makes it rarer). A ping costs less than the TCP packet carrying it.
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
]
