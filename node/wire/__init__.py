"""The generated protobuf/gRPC modules of proto/edgeshard/v1/edgeshard.proto (see scripts/gen_proto.py).

`edgeshard_pb2` and `edgeshard_pb2_grpc` are generated and committed; never edit them by hand, run
`python scripts/gen_proto.py` after changing the proto.
"""

PROTOCOL_VERSION = 3  # the wire protocol a node speaks; bump only for incompatible changes
# v2: ForwardMessage.batch and Result.batch (a v1 peer would drop the messages inside a batch)
# v3: ForwardMessage.draft and Result.tokens (a v2 last node would sample after the proposals, not check them)
