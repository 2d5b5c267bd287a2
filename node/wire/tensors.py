"""Tensors and steps to and from the wire: raw bytes + dtype + shape, validated on arrival. No pickle.

Pure functions over the generated protobuf messages; the servicer and the ring code call them. Every check
raises `WireError` carrying the gRPC status code to answer with and a message that says what was wrong.

Wire dtype: a node sends what its stage hands over, in the stage's compute dtype: bf16 for bf16/int8/int4
shards (the stage keeps its residual stream in f32 and rounds it to bf16 once, at its boundary: half the
bytes of f32), f32 for f32 shards, so a distributed f32 run is bit-identical to `--local` (a bf16 split is
not: each boundary adds one rounding). f16 is accepted for devices that compute in it. Whatever arrives is
cast by the receiving stage itself.
"""

from __future__ import annotations

import grpc
import numpy as np
import torch

from edgeshard.node.model.executor import StepRequest
from edgeshard.node.wire import edgeshard_pb2 as pb

# Rows (tokens) one step may carry: keeps a single message's compute bounded (the coordinator's prefill
# chunk is 512).
MAX_STEP_ROWS = 2048

TO_WIRE_DTYPE = {torch.bfloat16: pb.DTYPE_BF16, torch.float16: pb.DTYPE_F16, torch.float32: pb.DTYPE_F32}
FROM_WIRE_DTYPE = {v: k for k, v in TO_WIRE_DTYPE.items()}
_ITEMSIZE = {pb.DTYPE_BF16: 2, pb.DTYPE_F16: 2, pb.DTYPE_F32: 4}
_NUMPY = {pb.DTYPE_F16: np.float16, pb.DTYPE_F32: np.float32}  # numpy has no bf16


class WireError(Exception):
    """A message the node refuses or cannot serve: a gRPC status code and a message saying what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_proto(self, node: str) -> pb.Error:
        """The error as it travels on the wire."""
        return pb.Error(code=self.code.value[0], message=self.message, node=node)


def invalid(message: str) -> WireError:
    """An INVALID_ARGUMENT error (the sender made a malformed or inapplicable message)."""
    return WireError(grpc.StatusCode.INVALID_ARGUMENT, message)


def status_code(value: int) -> grpc.StatusCode:
    """grpc.StatusCode for its integer value (UNKNOWN for values this grpc does not know)."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def tensor_to_wire(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a float tensor as raw little-endian bytes + dtype + shape (one copy, into the message)."""
    dtype = TO_WIRE_DTYPE.get(t.dtype)
    if dtype is None:
        raise ValueError(f"cannot send a {t.dtype} tensor; the wire carries bf16, f16 or f32")
    msg = out if out is not None else pb.Tensor()
    msg.dtype = dtype
    msg.shape[:] = t.shape
    # A (T, D) bf16 tensor viewed as (T, 2D) bytes; numpy has no bf16, uint8 is the portable view.
    msg.data = t.contiguous().view(torch.uint8).numpy().tobytes()
    return msg


def tensor_from_wire(msg: pb.Tensor, hidden_size: int, max_rows: int = MAX_STEP_ROWS) -> torch.Tensor:
    """Decode and validate hidden states (T, hidden_size); raises WireError(INVALID_ARGUMENT) saying why."""
    dtype = FROM_WIRE_DTYPE.get(msg.dtype)
    if dtype is None:
        name = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
        raise invalid(f"tensor dtype {name} is not accepted; send DTYPE_BF16, DTYPE_F16 or DTYPE_F32")
    shape = tuple(msg.shape)
    if len(shape) != 2 or shape[1] != hidden_size:
        raise invalid(f"hidden states must have shape (T, {hidden_size}), got {shape}")
    rows = shape[0]
    if not 1 <= rows <= max_rows:
        raise invalid(f"a step carries 1..{max_rows} rows, got {rows}; split longer prompts into chunks")
    want = rows * hidden_size * _ITEMSIZE[msg.dtype]
    if len(msg.data) != want:
        raise invalid(
            f"tensor data is {len(msg.data)} bytes but shape {shape} of {pb.DType.Name(msg.dtype)} needs {want}"
        )
    # NaN/inf would poison the session's KV cache and make the last node's sampler fail; a stage never sends them
    # bytearray: a writable copy (torch refuses to alias immutable bytes without a warning; the copy is tiny)
    np_dtype = _NUMPY.get(msg.dtype)
    if np_dtype is not None:
        # numpy, not torch: this runs on every hop right after the node woke up, and torch's isfinite + all +
        # bool cost ~30 us hot and ~200 us with cold caches (docs/pipeline.md); a float64 sum is finite
        # exactly when every element is (f32/f16 values cannot overflow it)
        arr = np.frombuffer(bytearray(msg.data), dtype=np_dtype)
        if not np.isfinite(arr.sum(dtype=np.float64)):
            raise invalid("hidden states contain NaN or infinity; the sending node's stage is broken")
        return torch.from_numpy(arr).view(rows, hidden_size)
    hidden = torch.frombuffer(bytearray(msg.data), dtype=dtype).view(rows, hidden_size)
    if not bool(torch.isfinite(hidden).all()):
        raise invalid("hidden states contain NaN or infinity; the sending node's stage is broken")
    return hidden


def tokens_from_wire(msg: pb.TokenIds, vocab_size: int, max_rows: int = MAX_STEP_ROWS) -> torch.Tensor:
    """Decode and validate token ids (T,) int64."""
    n = len(msg.ids)
    if not 1 <= n <= max_rows:
        raise invalid(f"a step carries 1..{max_rows} token ids, got {n}; split longer prompts into chunks")
    lo, hi = min(msg.ids), max(msg.ids)  # plain Python: a tensor op per check costs more (docs/pipeline.md)
    if lo < 0 or hi >= vocab_size:
        raise invalid(f"token ids must be in [0, {vocab_size}), got {lo}..{hi}")
    return torch.tensor(msg.ids, dtype=torch.long)


def step_from_wire(
    msg: pb.ForwardMessage, is_first: bool, hidden_size: int, vocab_size: int, max_rows: int = MAX_STEP_ROWS
) -> StepRequest:
    """A validated StepRequest from a step message (tokens for the first stage, hidden states otherwise)."""
    which = msg.WhichOneof("payload")
    if is_first and which != "tokens":
        raise invalid(f"this node runs the first stage and takes token ids, got a {which or 'empty'} payload")
    if not is_first and which != "hidden":
        raise invalid(
            f"this node runs a middle or last stage and takes hidden states, got {which or 'nothing'}"
        )
    if not msg.session_id:
        raise invalid("a step needs a session_id")
    draft = list(msg.draft) or None
    if draft is not None and not all(0 <= d < vocab_size for d in draft):
        raise invalid(f"proposed token ids (draft) must be in [0, {vocab_size})")
    if is_first:
        return StepRequest(
            msg.session_id,
            msg.start,
            tokens=tokens_from_wire(msg.tokens, vocab_size, max_rows),
            sample=msg.sample,
            draft=draft,
        )
    return StepRequest(
        msg.session_id,
        msg.start,
        hidden=tensor_from_wire(msg.hidden, hidden_size, max_rows),
        sample=msg.sample,
        draft=draft,
    )


def error_message(msg: pb.ForwardMessage, err: pb.Error) -> pb.ForwardMessage:
    """The message that carries a failed step's error on along the ring."""
    return pb.ForwardMessage(
        plan_id=msg.plan_id, session_id=msg.session_id, start=msg.start, sample=msg.sample, error=err
    )


def sampling_from_wire(msg: pb.SamplingParams):
    """SamplingParams from the wire (top_p 0 reads as 1); raises WireError when out of range."""
    from edgeshard.node.model.sampling import SamplingParams

    try:
        return SamplingParams(
            temperature=float(msg.temperature),
            top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
            top_k=int(msg.top_k),
            seed=int(msg.seed) if msg.HasField("seed") else None,
        )
    except ValueError as e:
        raise invalid(f"bad sampling parameters: {e}") from None


def sampling_to_wire(params) -> pb.SamplingParams:
    """The wire form of a SamplingParams."""
    msg = pb.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    if params.seed is not None:
        msg.seed = params.seed
    return msg
