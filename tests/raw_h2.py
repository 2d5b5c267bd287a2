"""A raw HTTP/2 gRPC call (the `h2` package): sends header bytes no gRPC client library would (non-ASCII, not
UTF-8), as a stranger's hand-made client can. Plaintext only (a node in --insecure mode, or an in-process
server), which is enough: the interceptor runs the same behind TLS."""

from __future__ import annotations

import socket

import h2.config
import h2.connection
import h2.events


def raw_grpc_call(
    host: str,
    port: int,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"\x00\x00\x00\x00\x00",  # one empty gRPC message
    timeout: float = 10.0,
) -> dict[bytes, bytes]:
    """The response headers and trailers (grpc-status, grpc-message) of one unary call."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    with socket.create_connection((host, port), timeout=timeout) as s:
        conn.initiate_connection()
        base = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", f"{host}:{port}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        conn.send_headers(1, base + list(headers))
        conn.send_data(1, body, end_stream=True)
        s.sendall(conn.data_to_send())
        got: dict[bytes, bytes] = {}
        while True:
            data = s.recv(65536)
            if not data:
                return got
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    got.update(dict(ev.headers))
                if isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    return got
            s.sendall(conn.data_to_send())
