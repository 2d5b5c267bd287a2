"""A node's lasting identity: a random id kept in its state directory, claimed by one process at a time.

    ~/.local/state/edgeshard/node_id     the id (hex), made on first start
    ~/.local/state/edgeshard/node.lock   held (flock) while a node process runs with this directory

The id names the machine across restarts, so a coordinator recognises a board that rebooted. Two node
processes on one machine must not share it: the second one finds the lock taken and runs with a temporary
id (and says so). Two machines with the same id - a cloned SD card copies the state directory - are found
on the LAN by mDNS (node/presence/advertise.py warns on the node, `edgeshard nodes` and `doctor` on the coordinator).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("edgeshard.node")


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/edgeshard, or ~/.local/state/edgeshard."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "edgeshard"


@dataclass
class NodeIdentity:
    """The id a node runs with; `lasting` is False for a temporary one (state directory unusable or taken)."""

    node_id: str
    state_dir: Path | None
    lasting: bool
    _lock: IO | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the state directory back (the lock also goes when the process exits)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def claim_identity(state_dir: Path | None = None) -> NodeIdentity:
    """The id kept in `state_dir` (default: `default_state_dir()`), made there on first use.

    Never fails: a directory that cannot be written or is held by another node process gives a temporary
    id, with a warning that says how to get a lasting one.
    """
    directory = (state_dir or default_state_dir()).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = _try_lock(directory / "node.lock")
    except OSError as e:
        log.warning(
            "state dir %s is not usable (%s); running with a temporary node id. "
            "Pass --state-dir DIR with a writable directory to keep one.",
            directory,
            e,
        )
        return NodeIdentity(uuid.uuid4().hex, None, False)
    if lock is None:
        log.warning(
            "another node process on this machine uses state dir %s; this one runs with a temporary "
            "node id. Give each node on one machine its own --state-dir.",
            directory,
        )
        return NodeIdentity(uuid.uuid4().hex, None, False)
    path = directory / "node_id"
    try:
        node_id = path.read_text().strip()
    except FileNotFoundError:
        node_id = ""
    if not node_id:
        node_id = uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        tmp.write_text(node_id + "\n")
        tmp.replace(path)  # atomic: a crash never leaves a half-written id
    return NodeIdentity(node_id, directory, True, lock)


def _try_lock(path: Path) -> IO | None:
    """An open file holding an exclusive flock on `path`, or None when another process holds it."""
    f = path.open("a+")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, one node per state dir is then the user's job
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f
