"""Is this file safe to load code from? Nobody but us (or root) could have written it, or anything above it.

No native code is ever loaded from a path another user can write: a kernel library whose name is computable
from the public source, sitting in a cache another user can write (a shared classroom home, an NFS cache, a
world-writable directory), would otherwise run that user's code inside the node, with the node's cluster key
in reach. The low-bit kernels (node/lowbit/native.py) call `untrusted_reason` before `ctypes.CDLL`; this is
the bottom room of node/ (beside errors) so that every room may use it.

The rule (as sudo's and OpenSSH's safe-path checks): the file is a regular file, not a symlink; it and every
directory above it up to `trusted_root` are owned by this process's effective user or by root and are not
group- or world-writable. A world-writable directory with the sticky bit (/tmp) is allowed *above* one of
ours: nobody else may rename or delete what we own in it, and whatever another user created there first is
owned by them and refused.
"""

from __future__ import annotations

import os
import platform
import stat
from pathlib import Path

from edgeshard.node.errors import EdgeshardError


class UnsafePathError(EdgeshardError, OSError):
    """A path another user could have written (or a symlink where a file must be): refused."""


def untrusted_reason(path: str | os.PathLike[str], trusted_root: str | os.PathLike[str] = "/") -> str | None:
    """None when `path` is a regular file nobody but us (or root) could have written, else why not (a phrase
    naming the offending path). Directories are checked from the file's up to `trusted_root` (inclusive;
    default: the file system root); a symlinked directory is checked where it points."""
    p = Path(os.path.abspath(os.fspath(path)))
    root = Path(os.path.abspath(os.fspath(trusted_root)))
    try:
        st = os.lstat(p)
    except OSError as e:
        return f"{p}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{p} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{p} is not a regular file"
    why = _owner_problem(p, st)
    if why:
        return why
    for d in p.parents:
        try:
            st = os.lstat(d)
        except OSError as e:
            return f"{d}: {e.strerror}"
        if stat.S_ISLNK(st.st_mode):
            # a symlinked directory (/home -> /var/home) is as safe as where it points: check that instead
            why = _untrusted_dir(Path(os.path.realpath(d)), root)
        else:
            why = _owner_problem(d, st, sticky_ok=True)
        if why:
            return why
        if d == root:
            break
    return None


def _untrusted_dir(d: Path, root: Path) -> str | None:
    """`untrusted_reason` for a directory and its parents (the target of a symlinked directory)."""
    for x in (d, *d.parents):
        try:
            st = os.lstat(x)
        except OSError as e:
            return f"{x}: {e.strerror}"
        why = _owner_problem(x, st, sticky_ok=True)
        if why:
            return why
        if x == root:
            break
    return None


def _owner_problem(p: Path, st: os.stat_result, sticky_ok: bool = False) -> str | None:
    if st.st_uid not in (os.geteuid(), 0):
        return f"{p} is owned by another user (uid {st.st_uid})"
    if sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None  # /tmp-like: others may add entries but not touch ours (and theirs are refused above)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "everyone" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{p} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def trusted_file(path: str | os.PathLike[str], trusted_root: str | os.PathLike[str] = "/") -> bool:
    """True when `untrusted_reason(path, trusted_root)` finds nothing wrong."""
    return untrusted_reason(path, trusted_root) is None


def cpu_identity() -> str:
    """This CPU's model and feature flags (Linux /proc/cpuinfo; else platform.processor()), for cache keys of
    code built with -march=native: a library built on another CPU may use instructions this one lacks."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        text = ""
    first = text.split("\n\n", 1)[0]  # the first processor's block: every core of one machine agrees
    wanted = (
        "vendor_id",
        "model name",
        "cpu family",
        "model",
        "flags",
        "Features",
        "CPU part",
        "CPU implementer",
    )
    lines = [ln.strip() for ln in first.splitlines() if ln.split(":", 1)[0].strip() in wanted]
    return "\n".join(lines) or platform.processor() or platform.machine()
