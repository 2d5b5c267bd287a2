"""Bounds on what one caller can make a node hold: ids, subscribers, concurrent streams.

The data path checks tensors against the shard (node/wire/tensors.py: dtype, rows x hidden, byte count, at
most MAX_STEP_ROWS rows) and gRPC caps every message at MAX_MESSAGE_BYTES on both ends; sessions are capped
by --max-sessions (RESOURCE_EXHAUSTED). What is left are the strings a node keeps as dictionary keys for as
long as a session or stream lives - a session id of 60 MB times 64 sessions would be gigabytes - and the
number of streams and subscribers one caller may hold open. Every check raises `WireError` with the status to
answer.
"""

from __future__ import annotations

import grpc

from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import WireError, invalid

MAX_ID_CHARS = 128  # session ids and Results subscriber names (coordinators use uuid-sized ones)
MAX_SUBSCRIBERS = 64  # Results streams open at once on a node (one per coordinator in practice)
MAX_CONCURRENT_STREAMS = 100  # calls in flight on one HTTP/2 connection (a coordinator needs a handful)
# Messages waiting for the stage (node/service/ring.py): past either bound a stream is not read until the stage has
# caught up (gRPC flow control then slows the sender), so a sender cannot queue unbounded work on a node.
MAX_QUEUED_MESSAGES = 1024
MAX_QUEUED_ROWS = 4096

# gRPC server options added to the shared GRPC_OPTIONS (wire/options.py) on a node's server
SERVER_OPTIONS: list[tuple[str, int]] = [("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS)]


def check_forward(msg: pb.ForwardMessage) -> None:
    """Refuse a Forward message whose ids exceed the limits (before the node stores them anywhere)."""
    if len(msg.session_id) > MAX_ID_CHARS:
        raise invalid(f"session_id has {len(msg.session_id)} characters; at most {MAX_ID_CHARS}")
    if msg.WhichOneof("payload") == "open" and len(msg.open.reply_to) > MAX_ID_CHARS:
        raise invalid(f"reply_to has {len(msg.open.reply_to)} characters; at most {MAX_ID_CHARS}")


def check_subscriber(name: str, open_now: int) -> None:
    """Refuse a Results subscription with an oversized name, or beyond MAX_SUBSCRIBERS open at once."""
    if len(name) > MAX_ID_CHARS:
        raise invalid(f"subscriber has {len(name)} characters; at most {MAX_ID_CHARS}")
    if open_now >= MAX_SUBSCRIBERS:
        raise WireError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this node has {open_now} Results streams open; close some (one per coordinator is enough)",
        )
