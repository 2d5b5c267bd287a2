"""Files that hold secrets or code: written private from the first byte, loaded only when nobody else could
have written them.

- `write_private(path, text)`: a key file is created mode 0600 by the `open` itself (O_CREAT|O_EXCL|
  O_NOFOLLOW), never written first and chmod-ed after, and never through a symlink planted at the target.
  Replacing one (`secret new --force`) writes a new 0600 file next to it and renames it over the old one: a
  reader who opened the old file earlier (when it was perhaps still readable) keeps the old inode and never
  sees the new key.
- `trusted_file(path)`: the check before native code (a kernel library) is loaded: the file and every
  directory above it must be owned by us or root and writable by nobody else, and the file must not be a
  symlink. Anyone who could write any of them could otherwise run code inside the node and read its key
  (a shared classroom home, an NFS cache, a world-writable /tmp).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from edgeshard.node.errors import EdgeshardError


class UnsafePathError(EdgeshardError, OSError):
    """A path another user could have written (or a symlink where a file must be): refused."""


def write_private(path: str | os.PathLike[str], text: str, overwrite: bool = False) -> Path:
    """Write `text` to `path` readable and writable by the owner only (0600 from creation on).

    Without `overwrite` an existing path (a dangling symlink included) raises FileExistsError. With it, the
    new content goes to a temporary 0600 file in the same directory that then replaces `path` atomically; a
    symlink at `path` is refused (UnsafePathError), never followed."""
    p = Path(path).expanduser()
    if not overwrite:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        _write_all(fd, text)
        return p
    if p.is_symlink():
        raise UnsafePathError(
            f"{p} is a symbolic link; refusing to write a key through it (remove it, or name the real file)"
        )
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")  # 0600, O_EXCL
    try:
        _write_all(fd, text)
        os.replace(tmp, p)  # replaces a link planted meanwhile rather than following it
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def _write_all(fd: int, text: str) -> None:
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def untrusted_reason(path: str | os.PathLike[str], trusted_root: str | os.PathLike[str] = "/") -> str | None:
    """None when `path` is a regular file nobody but us (or root) could have written, else why not.

    Checked: `path` is not a symlink, is a regular file; it and every directory from its parent up to
    `trusted_root` (inclusive; default: the file system root) are owned by this process's effective user or
    by root and are not group- or world-writable. A world-writable directory with the sticky bit (/tmp) is
    still refused: another user may not replace our file there, but may have created it (or a directory in
    the path) first."""
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
            why = untrusted_reason_dir(Path(os.path.realpath(d)), root)
        else:
            why = _owner_problem(d, st)
        if why:
            return why
        if d == root:
            break
    return None


def untrusted_reason_dir(d: Path, root: Path) -> str | None:
    """`untrusted_reason` for a directory and its parents (the target of a symlinked directory)."""
    for x in (d, *d.parents):
        try:
            st = os.lstat(x)
        except OSError as e:
            return f"{x}: {e.strerror}"
        why = _owner_problem(x, st)
        if why:
            return why
        if x == root:
            break
    return None


def _owner_problem(p: Path, st: os.stat_result) -> str | None:
    if st.st_uid not in (os.geteuid(), 0):
        return f"{p} is owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "everyone" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{p} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def trusted_file(path: str | os.PathLike[str], trusted_root: str | os.PathLike[str] = "/") -> bool:
    """True when `untrusted_reason(path, trusted_root)` finds nothing wrong."""
    return untrusted_reason(path, trusted_root) is None
