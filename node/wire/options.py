"""The gRPC settings every hop shares: message size bounds and keepalive (a tiny module: security and
the coordinator import it without the tensor code)."""

# Largest gRPC message a node sends or accepts. A prefill chunk of 512 rows of an 8192-wide f32 model is
# 16 MiB; the margin leaves room for larger chunks without letting one message eat a small device's memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Hops are long-lived: keepalive notices a dead peer on an idle ring instead of at the next token.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
