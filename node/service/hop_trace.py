"""A timestamp trace of the token path, in every process, behind an environment switch.

    EDGESHARD_HOP_TRACE=/some/dir python benchmarks/hop_trace.py ...

With the variable unset (always, in normal use) `mark` is a no-op costing one global read. With it set, each
process appends `(wall-clock ns, pid, event, session, start)` rows to `DIR/trace-<pid>.tsv`, buffered and
flushed every few hundred rows and at exit, so the trace does not add a write to every hop. Wall-clock
(CLOCK_REALTIME) stamps compare across the processes of one machine; `benchmarks/hop_trace.py` joins them into
where the time of one decode token goes (docs/pipeline.md, Performance).

Why not a profiler: the question is the time *between* processes (a gRPC hop, an event loop waking up), which
no single-process profiler sees.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

ENV = "EDGESHARD_HOP_TRACE"
FLUSH_EVERY = 512

_dir = os.environ.get(ENV) or None
_rows: list[str] = []


def enabled() -> bool:
    """Whether this process records a trace."""
    return _dir is not None


def mark(event: str, session: str = "", start: int = -1) -> None:
    """Record that `event` happened now to the step (`session`, `start`) (no-op unless tracing)."""
    if _dir is None:
        return
    _rows.append(f"{time.time_ns()}\t{os.getpid()}\t{event}\t{session}\t{start}\n")
    if len(_rows) >= FLUSH_EVERY:
        flush()


def flush() -> None:
    """Append the buffered rows to this process's trace file."""
    if _dir is None or not _rows:
        return
    path = Path(_dir) / f"trace-{os.getpid()}.tsv"
    with path.open("a") as f:
        f.writelines(_rows)
    _rows.clear()


atexit.register(flush)
