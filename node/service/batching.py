"""Continuous batching on a node: which queued messages run together in one `executor.step`.

Messages arrive on the node's Forward streams while its stage computes and wait in the node's inbox
(node/service/ring.py). When the stage is free it takes all the ready work at once (`take_batch`):

* at most one step per session, in arrival order: a session's next step needs the cache its previous one
  writes, so it waits for the next batch;
* at most `max_prefill_rows` rows of multi-row steps (prefill chunks; 128, the coordinator's chunk) and at
  most `max_rows` rows: a long prompt delays the decodes that share its batch by one chunk's compute, never
  by the whole prompt, while short prompts that arrive together (a class sending its questions at once)
  prefill in one forward instead of one each. The first step queued always runs, whatever its size, so
  nothing starves;
* at most `max_seqs` sequences: a node of an N-node ring takes at most 1/N of its sessions at once
  (`group_size`), so the sequences circulate as N groups, one at each node, and every stage computes at the
  same time. Without the cap the groups merge whenever two meet in a queue and end as one, which the nodes
  pass around in turn while the others idle. (On one core for every node one group would use less CPU per
  token; on separate devices, what a ring is for, N groups keep N stages busy.)
* control messages (open, end, an upstream error, a step that failed to decode) run just before the batch,
  unless an earlier message of their session is still queued or in the batch: then they wait for the next
  one, keeping each session's order. Controls also keep their order among themselves, so an End that frees
  KV memory runs before a later Open that needs it.

`StageTimes` keeps where the stage's time goes (idle, queueing, batch sizes) for GetInfo.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeshard.node.model.executor import StepRequest
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire.tensors import WireError

STEP_KINDS = ("tokens", "hidden")  # payloads that run the stage; the others are control messages
# upper bounds of the batch-size histogram buckets (sequences per step); one more bucket counts the rest
HIST_BOUNDS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_ROWS = 128  # prefill rows one batch takes at most (coordinator.generate.PREFILL_CHUNK: one chunk)


@dataclass
class Pending:
    """A Forward message waiting for the stage, with the stream its error replies go to."""

    msg: pb.ForwardMessage
    reply: Callable[[pb.ForwardReply], None]
    kind: str  # the payload: tokens, hidden, open, end, error (or "" when it has none)
    req: StepRequest | None = None  # decoded on arrival (steps)
    error: WireError | None = None  # refused on arrival (a malformed step): answered in order
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def is_step(self) -> bool:
        """A step the stage computes (decoded without error)."""
        return self.req is not None and self.error is None


def group_size(sessions: int, stages: int) -> int | None:
    """Sequences one batch takes at most on a node of a `stages`-node ring holding `sessions` (None: no cap)."""
    return -(-sessions // stages) if stages > 1 and sessions else None


def take_batch(
    inbox: deque[Pending], max_rows: int, max_seqs: int | None = None, max_prefill_rows: int = PREFILL_ROWS
) -> tuple[list[Pending], list[Pending]]:
    """Take one batch's work out of `inbox`: (controls to run first, steps to run in one forward).

    What is not taken stays in `inbox`, in order (see the module docstring for the rules).
    """
    controls: list[Pending] = []
    steps: list[Pending] = []
    keep: deque[Pending] = deque()
    waiting: set[str] = set()  # sessions with an earlier message left in the inbox
    stepping: set[str] = set()  # sessions with a step in this batch
    rows, prefill_rows, controls_wait = 0, 0, False
    for item in inbox:
        sid = item.msg.session_id
        if sid in waiting:
            keep.append(item)
            controls_wait |= not item.is_step  # a control kept back holds back the later ones
            continue
        if item.is_step:
            n = item.req.length
            fits = not steps or (
                rows + n <= max_rows
                and (n == 1 or prefill_rows + n <= max_prefill_rows)
                and (max_seqs is None or len(steps) < max_seqs)
            )
            if sid in stepping or not fits:
                waiting.add(sid)
                keep.append(item)
                continue
            steps.append(item)
            stepping.add(sid)
            rows += n
            prefill_rows += n if n > 1 else 0
        elif sid in stepping or controls_wait:
            waiting.add(sid)
            controls_wait = True  # later controls of every session wait too (End before a later Open)
            keep.append(item)
        else:
            controls.append(item)
    inbox.clear()
    inbox.extend(keep)
    return controls, steps


@dataclass
class StageTimes:
    """Where a stage's time goes since its shard was installed (GetInfo's NodeStats)."""

    started: float = field(default_factory=time.perf_counter)
    idle_s: float = 0.0  # nothing queued, nothing running
    idle_since: float | None = None  # set while the stage waits for work
    queue_s: float = 0.0  # summed over steps: arrival -> start of their batch
    rows: int = 0
    sequences: int = 0
    batch_hist: list[int] = field(default_factory=lambda: [0] * (len(HIST_BOUNDS) + 1))

    def record(self, steps: list[Pending], now: float) -> None:
        """Count a batch of `steps` that starts at `now`."""
        self.sequences += len(steps)
        self.rows += sum(s.req.length for s in steps)
        self.queue_s += sum(now - s.arrived for s in steps)
        self.batch_hist[_bucket(len(steps))] += 1

    def to_stats(self) -> dict:
        """The NodeStats fields these times fill (the idle period going on now included)."""
        now = time.perf_counter()
        idle = self.idle_s + (now - self.idle_since if self.idle_since is not None else 0.0)
        return {
            "wall_ms": (now - self.started) * 1e3,
            "idle_ms": idle * 1e3,
            "queue_ms": self.queue_s * 1e3,
            "rows": self.rows,
            "sequences": self.sequences,
            "batch_hist": list(self.batch_hist),
        }


def _bucket(n: int) -> int:
    for i, bound in enumerate(HIST_BOUNDS):
        if n <= bound:
            return i
    return len(HIST_BOUNDS)
