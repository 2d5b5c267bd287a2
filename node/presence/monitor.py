"""Keeping a node's capability current: re-measured while the node is idle, smoothed over the last runs."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
from collections.abc import Callable
from pathlib import Path

from edgeshard.node.presence.capability import _BENCH_FIELDS, Capability
from edgeshard.node.presence.microbench import measure


class CapabilityMonitor:
    """The node's capability, re-measured while the node is idle and smoothed over the last few runs.

    A board that is also used for other things (an old laptop) or a shared machine is faster or slower from
    one minute to the next; one measurement at start would pin whatever happened in that second. So the node
    re-runs the microbenchmark every `every_s` seconds while it serves no steps, and reports the field-wise
    median of the last `keep` runs (memory figures are always read fresh).
    """

    def __init__(
        self, first: Capability, every_s: float = 300.0, keep: int = 5, state_dir: Path | None = None
    ) -> None:
        self.runs: list[Capability] = [first]
        self.every_s, self.keep, self.state_dir = every_s, keep, state_dir

    @property
    def current(self) -> Capability:
        """The smoothed capability (median of the kept runs)."""
        if len(self.runs) == 1:
            return self.runs[0]
        figures = {f: statistics.median(getattr(c, f) for c in self.runs) for f in _BENCH_FIELDS}
        return dataclasses.replace(self.runs[-1], **figures)

    def add(self, cap: Capability) -> None:
        """Record one more run (the oldest is dropped beyond `keep`)."""
        self.runs = [*self.runs, cap][-self.keep :]

    async def run(self, is_idle: Callable[[], bool], on_update: Callable[[Capability], None]) -> None:
        """Re-measure every `every_s` seconds when `is_idle()` (in a worker thread: the node keeps serving),
        handing each new smoothed capability to `on_update`."""
        while self.every_s:
            # +-20% jitter: nodes sharing a machine (tests, classroom mode) drift apart instead of measuring
            # each other's benchmark
            await asyncio.sleep(self.every_s * random.uniform(0.8, 1.2))
            if is_idle():
                cap = await asyncio.to_thread(
                    measure, None, self.runs[-1].memory_limit, state_dir=self.state_dir
                )
                self.add(cap)
                on_update(self.current)


def start_remeasuring(servicer, every_s: float):
    """The task that keeps `servicer.capability` (service/server.py) current; None when `every_s` is 0.

    Idle means: no shard is loading and no step ran since the last look.
    """
    if not every_s or not servicer.capability.measured:
        return None
    node, seen = servicer.node, [-1]

    def idle() -> bool:
        steps = node.shard.executor.steps if node.shard is not None else 0
        was, seen[0] = seen[0], steps
        return steps == was and not node.loading

    monitor = CapabilityMonitor(servicer.capability, every_s, state_dir=servicer.options.state_dir)
    return asyncio.create_task(monitor.run(idle, lambda cap: setattr(servicer, "capability", cap)))
