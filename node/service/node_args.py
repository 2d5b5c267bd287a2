"""The flags of `edgeshard node` and the defaults they show, in a module that loads no torch.

`edgeshard node --help` builds its parser from `add_node_args`; with the flags in node/service/server.py (which
imports the ring, the stage and so torch) the help took ~2 s on a 2-vCPU machine and far longer on a Pi. The ring
(node/service/ring.py) takes its defaults from here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeshard.node.presence.advertise import interface_address
from edgeshard.node.security.channels import add_security_args

MAX_BATCH_ROWS = 256  # rows one batched forward takes at most (--max-batch-rows); a bigger step runs alone
COMPUTE_MODES = ("thread", "inline")  # where the stage computes (--compute; see node/service/ring.py)
SESSION_IDLE_S = 1800.0  # a session nobody stepped for this long is ended (--session-idle-timeout)


def add_node_args(p: argparse.ArgumentParser) -> None:
    """The flags of `edgeshard node` (also `python -m edgeshard.node.service.server`)."""
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one")
    p.add_argument(
        "--name",
        default=None,
        help="name shown in plans and tables (default: hostname:port, unique per node)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="the only directory model files are opened from (default: the model cache)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the node keeps its lasting id (default: ~/.local/state/edgeshard)",
    )
    p.add_argument("--max-sessions", type=int, default=64, help="sessions (KV caches) held at once")
    p.add_argument(
        "--kv-budget",
        default=None,
        metavar="SIZE",
        help="memory KV caches may reserve, e.g. 256M; a session reserves its whole cache when it opens and "
        "more are refused (RESOURCE_EXHAUSTED) (default: what --memory-limit leaves after the weights, "
        "else half the memory available once the weights are loaded)",
    )
    p.add_argument(
        "--session-idle-timeout",
        type=float,
        default=SESSION_IDLE_S,
        metavar="S",
        help=f"end a session nobody has stepped for S seconds, freeing its KV cache (default {SESSION_IDLE_S:g}; "
        "0: never). Sessions also end when the stream that opened them closes (a coordinator exits or crashes)",
    )
    p.add_argument(
        "--max-batch-rows",
        type=int,
        default=MAX_BATCH_ROWS,
        metavar="N",
        help=f"rows (tokens) one batched forward takes at most (default {MAX_BATCH_ROWS})",
    )
    p.add_argument(
        "--compute",
        choices=COMPUTE_MODES,
        default="thread",
        help="run the stage in one worker thread (default: messages keep arriving while it computes) or "
        "inline on the event loop",
    )
    p.add_argument("--no-advertise", action="store_true", help="do not announce this node on mDNS")
    p.add_argument(
        "--mdns-interface",
        action="append",
        default=[],
        type=interface_address,
        metavar="IP",
        help="IPv4 address of an interface to run mDNS on (repeatable; default: all interfaces)",
    )
    p.add_argument(
        "--cluster", default="default", help="cluster name to announce (coordinators filter on it)"
    )
    p.add_argument(
        "--memory-limit",
        default=None,
        metavar="SIZE",
        help="memory the planner may use here for shards and KV, e.g. 512M or 2G (default: what is free)",
    )
    p.add_argument(
        "--cache-limit",
        default=None,
        metavar="SIZE",
        help="disk the cache of shipped model slices (<model-dir>/.edgeshard-slices) may use, e.g. 4G; the "
        "least recently used tensors no loaded shard needs are evicted (default: no limit)",
    )
    p.add_argument(
        "--no-benchmark",
        action="store_true",
        help="skip the start-up microbenchmark (the planner then assumes an average speed)",
    )
    p.add_argument(
        "--benchmark-every",
        type=float,
        default=300.0,
        metavar="S",
        help="re-run the microbenchmark every S seconds while idle; GetInfo reports the median of the last 5 "
        "runs (0: only at start)",
    )
    add_security_args(p)  # --cluster-key-file FILE / --insecure (or $EDGESHARD_CLUSTER_KEY)
    p.add_argument("--log-level", default="WARNING", help="logging level of the node (stderr)")
