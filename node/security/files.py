"""Files that hold secrets or code: written private from the first byte, loaded only when nobody else could
have written them.

- `write_private(path, text)`: a key file is created mode 0600 by the `open` itself (O_CREAT|O_EXCL|
  O_NOFOLLOW), never written first and chmod-ed after, and never through a symlink planted at the target.
  Replacing one (`secret new --force`) writes a new 0600 file next to it and renames it over the old one: a
  reader who opened the old file earlier (when it was perhaps still readable) keeps the old inode and never
  sees the new key.
- `trusted_file(path)` (re-exported from node/trust.py, which the low-bit kernels below this room use): the
  check before native code is loaded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from edgeshard.node.trust import UnsafePathError, trusted_file, untrusted_reason

__all__ = ["UnsafePathError", "trusted_file", "untrusted_reason", "write_private"]


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
