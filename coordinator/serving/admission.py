"""Admission of sequences onto a pipeline: running slots and KV memory, first come first served.

A sequence runs when a running slot is free (`max_running`) and the KV positions it may reach (prompt +
max_tokens) fit in what the cluster can hold (`kv_capacity`, positions summed over running sequences: the
smallest node budget divided by that node's bytes per position, see `kv_capacity` below). A sequence that
cannot run at once waits in a FIFO queue: a large request at the head is not overtaken by small ones forever.
The engine bounds the queue (`max_queued`) and answers 429 beyond it.

Reserving the whole `max_len` up front is what lets a sequence that was admitted finish without running out
of memory mid-generation (the nodes reserve the same when the session opens, node/model/executor.py); the price is
that a request asking for many tokens holds their memory from the start.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

QUEUED, RUNNING, DONE = "queued", "running", "done"


@dataclass(eq=False)
class Ticket:
    """One sequence's place: queued until `granted` resolves, then running until it leaves."""

    positions: int  # KV positions reserved while running
    granted: asyncio.Future = field(repr=False)
    state: str = QUEUED


class Admission:
    """Running slots and KV positions, granted in arrival order."""

    def __init__(self, max_running: int, kv_capacity: int | None = None) -> None:
        self._max_running = max_running
        self.kv_capacity = kv_capacity  # positions the running sequences may reserve in all (None: no limit)
        self.running = 0
        self.reserved = 0  # positions the running sequences hold
        self.queue: deque[Ticket] = deque()

    @property
    def max_running(self) -> int:
        """Sequences running at once at most (raising it admits waiting ones at once)."""
        return self._max_running

    @max_running.setter
    def max_running(self, value: int) -> None:
        self._max_running = value
        self._grant()

    @property
    def waiting(self) -> int:
        """Sequences queued now."""
        return len(self.queue)

    def fits(self, positions: int) -> bool:
        """A sequence of `positions` could start now (ignoring the queue)."""
        if self.running >= self._max_running:
            return False
        return self.kv_capacity is None or self.reserved + positions <= self.kv_capacity

    def can_start(self, positions: int) -> bool:
        """A sequence arriving now would start at once: nobody waits ahead of it and it fits."""
        return not self.queue and self.fits(positions)

    def enter(self, positions: int) -> Ticket:
        """Take a place: running now if `can_start`, else queued (await `ticket.granted`)."""
        ticket = Ticket(positions, asyncio.get_running_loop().create_future())
        if self.can_start(positions):
            self._start(ticket)
        else:
            self.queue.append(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """Give the place back (finished, failed or cancelled, running or still queued); idempotent."""
        if ticket.state == RUNNING:
            self.running -= 1
            self.reserved -= ticket.positions
        elif ticket.state == QUEUED:
            self.queue.remove(ticket)
        ticket.state = DONE
        self._grant()

    def _start(self, ticket: Ticket) -> None:
        ticket.state = RUNNING
        self.running += 1
        self.reserved += ticket.positions
        if not ticket.granted.done():
            ticket.granted.set_result(None)

    def _grant(self) -> None:
        while self.queue and self.fits(self.queue[0].positions):
            ticket = self.queue.popleft()
            if ticket.granted.cancelled():  # its task was cancelled while waiting; its leave() is a no-op
                ticket.state = DONE
                continue
            self._start(ticket)


def kv_capacity(shards: Sequence) -> int | None:
    """Positions of KV cache a ring can hold over all its sequences, from each node's ShardInfo (`kv_budget`
    bytes / `kv_bytes_per_position`); None when no node has a budget."""
    caps = [s.kv_budget // s.kv_bytes_per_position for s in shards if s.kv_budget and s.kv_bytes_per_position]
    return min(caps) if caps else None
