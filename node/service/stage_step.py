"""One batch on a node's stage: its control messages, then all its steps in one `executor.step`.

This is the compute side of the ring (node/service/ring.py runs it in the node's compute thread): it touches only the
executor and the messages it is given and returns an `Outcome` per message, which the ring hands on back on
the event loop (error replies to the sender, messages to the next hop, Results to subscribers).

Each step of a batch is validated on its own first, so one bad message fails alone; only a failure of the
forward itself (out of memory, a bug) fails the whole batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from edgeshard.node.model.executor import SessionError, ShardExecutor, StepError, StepResult
from edgeshard.node.service.batching import Pending
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import WireError, error_message, invalid, sampling_from_wire, tensor_to_wire

log = logging.getLogger("edgeshard.node")


@dataclass
class Outcome:
    """What became of one message: what goes on along the ring, and the error to answer its sender with."""

    item: Pending
    out: pb.ForwardMessage | pb.Result | None  # None: nothing goes on
    error: WireError | None = None


def run_batch(
    ex: ShardExecutor, node: str, controls: list[Pending], steps: list[Pending]
) -> tuple[list[Outcome], float]:
    """Run `controls` in order, then `steps` in one forward; the outcomes and seconds spent encoding."""
    done = [_control(ex, node, item) for item in controls]
    if not steps:
        return done, 0.0
    ok: list[Pending] = []
    for item in steps:
        try:
            ex.validate(item.req)
            ok.append(item)
        except (SessionError, StepError) as e:
            if item.msg.fed and item.msg.session_id not in ex.sessions:
                done.append(Outcome(item, None))  # the coordinator ended it while this step was on its way
                continue
            done.append(_failed(item, invalid(str(e)), node))
    if not ok:
        return done, 0.0
    try:
        results = ex.step([item.req for item in ok])
    except (SessionError, StepError) as e:  # validated above: only a cache that disagrees gets here
        err = invalid(str(e))
    except MemoryError as e:
        err = WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"node {node} ran out of memory: {e}")
    except Exception as e:  # a bug or a torch failure: fail this batch, keep serving the others
        log.exception("step of sessions %s failed", [item.msg.session_id for item in ok])
        err = WireError(grpc.StatusCode.INTERNAL, f"node {node} failed the step: {type(e).__name__}: {e}")
    else:
        t0 = time.perf_counter()
        done += [Outcome(item, _output(ex, item.msg, res)) for item, res in zip(ok, results, strict=True)]
        return done, time.perf_counter() - t0
    return done + [_failed(item, err, node) for item in ok], 0.0


def _control(ex: ShardExecutor, node: str, item: Pending) -> Outcome:
    """An open, end or upstream error (or a step that failed to decode), in its session's order."""
    msg = item.msg
    try:
        if item.error is not None:
            raise item.error
        if item.kind == "open":
            return Outcome(item, _open(ex, msg))
        if item.kind == "end":
            ex.close_session(msg.session_id)
        return Outcome(item, msg)  # an end, or an upstream error: carried on
    except WireError as e:
        return _failed(item, e, node)
    except Exception as e:
        log.exception("%s of session %r failed", item.kind, msg.session_id)
        err = WireError(grpc.StatusCode.INTERNAL, f"node {node} failed {item.kind}: {type(e).__name__}: {e}")
        return _failed(item, err, node)


def _open(ex: ShardExecutor, msg: pb.ForwardMessage) -> pb.ForwardMessage | pb.Result:
    if not msg.session_id:
        raise invalid("OpenSession needs a session_id")
    sampling = sampling_from_wire(msg.open.sampling)
    if msg.open.max_len and msg.open.max_len > ex.max_len:
        raise invalid(f"max_len {msg.open.max_len} exceeds this node's context length {ex.max_len}")
    try:
        ex.open_session(msg.session_id, sampling, max_len=msg.open.max_len or None)
    except OverflowError as e:  # --max-sessions or the KV budget
        raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
    if not ex.spec.is_last:
        return msg
    return pb.Result(kind=pb.RESULT_OPENED, plan_id=msg.plan_id, session_id=msg.session_id)


def _output(ex: ShardExecutor, msg: pb.ForwardMessage, res: StepResult) -> pb.ForwardMessage | pb.Result:
    """A step's result as it goes on: the sampled token (last stage) or hidden states for the next node."""
    if ex.spec.is_last:
        return pb.Result(
            kind=pb.RESULT_TOKEN,
            plan_id=msg.plan_id,
            session_id=msg.session_id,
            start=msg.start,
            sampled=res.token is not None,
            token=res.token or 0,
            tokens=res.tokens or (),
        )
    out = pb.ForwardMessage(
        plan_id=msg.plan_id, session_id=msg.session_id, start=msg.start, sample=msg.sample, draft=msg.draft
    )
    tensor_to_wire(res.hidden, out.hidden)
    if msg.HasField("feed"):  # for the last node (the token feed)
        out.feed.CopyFrom(msg.feed)
    return out


def _failed(item: Pending, err: WireError, node: str) -> Outcome:
    """Refuse the sender, and carry the error on along the ring to whoever waits for the step."""
    return Outcome(item, error_message(item.msg, err.to_proto(node)), err)
