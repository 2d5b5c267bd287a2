"""Plan ownership: a node serves one coordinator's plan at a time.

Without it, two coordinators fight over a node: a second `run --peers` reloads the shards under a running
`serve`, whose requests then fail. So the coordinator that loads a shard becomes its holder
(`LoadShardRequest.coordinator`), and a LoadShard from another coordinator is refused with FAILED_PRECONDITION
naming the holder while the holder still *holds* the node, unless the request sets `take_over`; the holder's
open Forward streams then get an error reply naming who took over.

Held means: the holder has not released the node (ReleasePlan, which `run` sends when it is done), and it
shows signs of life - a Forward or Results stream of its own open here, or a message of its plan, a load or a
GetInfo within `IDLE_RELEASE_S`. A coordinator that died without releasing therefore frees its nodes after
that long, and `--take-over` frees them at once. Coordinators identify their calls with the
`edgeshard-coordinator` metadata (their holder id); node-to-node streams carry none.
"""

from __future__ import annotations

import asyncio
import time

from edgeshard.node.wire import edgeshard_pb2 as pb

HOLDER_METADATA = "edgeshard-coordinator"  # gRPC metadata key: the calling coordinator's holder id
IDLE_RELEASE_S = 120.0  # a holder with no stream here and no activity for this long no longer holds the node


def caller_id(context) -> str:
    """The coordinator holder id a call carries in its metadata ("" for nodes and old coordinators)."""
    for key, value in context.invocation_metadata() or ():
        if key == HOLDER_METADATA:
            return value
    return ""


def describe(holder: pb.PlanHolder) -> str:
    """'edgeshard serve (pid 4711) on lab-pc' for messages."""
    name = holder.name or f"coordinator {holder.id[:8]}"
    return f"{name} on {holder.host}" if holder.host else name


class Ownership:
    """Who holds this node, and the holder's streams (to tell it when another coordinator takes over)."""

    def __init__(self, idle_release_s: float = IDLE_RELEASE_S) -> None:
        self.holder: pb.PlanHolder | None = None
        self.idle_release_s = idle_release_s
        self.last_active = 0.0  # monotonic time of the holder's last sign of life
        self.streams: dict[asyncio.Queue, str] = {}  # open coordinator Forward reply queues -> holder id
        self.open_calls: dict[str, int] = {}  # holder id -> its open Forward/Results streams here

    # ---- signs of life ------------------------------------------------------------------------------------
    def touch(self, coordinator_id: str = "") -> None:
        """The holder did something here (a message of its plan, a call carrying its id)."""
        if self.holder is not None and (not coordinator_id or coordinator_id == self.holder.id):
            self.last_active = time.monotonic()

    def opened(self, coordinator_id: str, replies: asyncio.Queue | None = None) -> None:
        """A coordinator opened a stream here (Forward with its reply queue, or Results)."""
        if not coordinator_id:
            return
        self.open_calls[coordinator_id] = self.open_calls.get(coordinator_id, 0) + 1
        if replies is not None:
            self.streams[replies] = coordinator_id
        self.touch(coordinator_id)

    def closed(self, coordinator_id: str, replies: asyncio.Queue | None = None) -> None:
        """... and closed it."""
        if not coordinator_id:
            return
        left = self.open_calls.get(coordinator_id, 1) - 1
        if left > 0:
            self.open_calls[coordinator_id] = left
        else:
            self.open_calls.pop(coordinator_id, None)
        if replies is not None:
            self.streams.pop(replies, None)
        self.touch(coordinator_id)

    # ---- holding ------------------------------------------------------------------------------------------
    def held(self) -> bool:
        """The holder still holds the node (see the module docstring)."""
        if self.holder is None:
            return False
        if self.open_calls.get(self.holder.id):
            return True
        return time.monotonic() - self.last_active < self.idle_release_s

    def refusal(self, request: pb.LoadShardRequest, node_name: str, address: str) -> str | None:
        """Why `request` may not load here now (another coordinator holds the node), or None."""
        if not self.held() or request.take_over:
            return None
        asking = request.coordinator.id if request.HasField("coordinator") else ""
        if asking and asking == self.holder.id:
            return None
        return (
            f"node {node_name} ({address}) serves the plan of {describe(self.holder)}; it is not yours to "
            "reload: wait until that coordinator is done, use other nodes, or pass --take-over to take it "
            "(that coordinator's requests then fail over)"
        )

    def loaded(self, request: pb.LoadShardRequest, node_name: str, old_plan_id: int) -> None:
        """A shard was loaded for `request`: its coordinator holds the node now; a holder taken over hears so
        (an error reply on its Forward streams, stamped with its plan `old_plan_id`)."""
        new = request.coordinator if request.HasField("coordinator") and request.coordinator.id else None
        old = self.holder
        if old is not None and (new is None or new.id != old.id):
            who = describe(new) if new is not None else "another coordinator"
            message = (
                f"node {node_name} was taken over by {who} (--take-over); this coordinator's plan no longer "
                "runs there"
            )
            for queue, holder_id in list(self.streams.items()):
                if holder_id == old.id:
                    queue.put_nowait(
                        pb.ForwardReply(
                            plan_id=old_plan_id,
                            error=pb.Error(code=9, message=message, node=node_name),  # FAILED_PRECONDITION
                        )
                    )
        if new is not None:
            self.holder = pb.PlanHolder()
            self.holder.CopyFrom(new)
            if not self.holder.since_unix_ms:
                self.holder.since_unix_ms = int(time.time() * 1000)
            self.last_active = time.monotonic()
        else:
            self.holder = None

    def release(self, coordinator_id: str) -> bool:
        """The holder lets go (the shard stays loaded for whoever comes next); False when it is not the holder."""
        if self.holder is None or not coordinator_id or coordinator_id != self.holder.id:
            return False
        self.holder = None
        return True

    def fill(self, shard: pb.ShardInfo) -> None:
        """Add the holder and whether it holds the node now to a ShardInfo."""
        if self.holder is not None:
            shard.holder.CopyFrom(self.holder)
            shard.held = self.held()
