"""This coordinator as the nodes it loads know it: plan ownership (node/service/ownership.py).

A node serves one coordinator's plan at a time. Every coordinator process has a random holder id, sent with
each LoadShard (`LoadShardRequest.coordinator`) and as `edgeshard-coordinator` metadata on its calls, so the
node knows whose streams are whose. A node another coordinator holds refuses our LoadShard unless we take it
over: `--take-over` on run/serve/cluster asks for that once, for the first deployment of the process (the
re-deployments of recovery never take a node from someone else; they wait for it or use others).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid

from edgeshard.node.service.ownership import HOLDER_METADATA, describe
from edgeshard.node.wire import edgeshard_pb2 as pb

_ID = uuid.uuid4().hex
_take_over_once = False
_role = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def set_role(role: str) -> None:
    """What this coordinator runs, for the nodes' messages (the CLI sets `edgeshard serve`, ...)."""
    global _role
    _role = role


def holder_id() -> str:
    """This process's holder id."""
    return _ID


def metadata() -> tuple[tuple[str, str], ...]:
    """The gRPC metadata naming this coordinator on its calls."""
    return ((HOLDER_METADATA, _ID),)


def this_coordinator() -> pb.PlanHolder:
    """This coordinator as a node's holder: its id, what it runs, and its host."""
    return pb.PlanHolder(
        id=_ID,
        name=f"{_role} (pid {os.getpid()})",
        host=socket.gethostname(),
        since_unix_ms=int(time.time() * 1000),
    )


def ask_to_take_over() -> None:
    """The user passed --take-over: the next deployment takes held nodes from their coordinator."""
    global _take_over_once
    _take_over_once = True


def take_over_now() -> bool:
    """Whether this deployment may take held nodes (True once after `ask_to_take_over`)."""
    global _take_over_once
    asked, _take_over_once = _take_over_once, False
    return asked


def held_elsewhere(info: pb.NodeInfo) -> str | None:
    """Who else holds the node GetInfo described (a sentence), or None when it is free or ours."""
    if not info.loaded or not info.shard.held or info.shard.holder.id in ("", _ID):
        return None
    return describe(info.shard.holder)
