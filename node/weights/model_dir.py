"""Which model files a node may open: only those under its `--model-dir`, or registry models pulled into it.

A coordinator names the model of a shard by a reference it sends over the network, so the reference is
untrusted input. It must be a relative path inside the node's model directory (no absolute paths, no `..`,
no symlinks that lead out of the directory once resolved) or a registry name such as `smollm2-135m`, which is
pulled into the model directory (the node's cache) on first use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import grpc

from edgeshard.node.wire.tensors import WireError

MAX_REF_CHARS = 1024  # a model reference longer than this is refused before touching the file system
MAX_INDEX_BYTES = 16 << 20  # a safetensors index is kilobytes; refuse to parse an absurd one


def default_model_dir() -> Path:
    """Where a node looks for models without --model-dir: the same cache `edgeshard models pull` fills."""
    from edgeshard.node.weights.registry import default_cache_dir

    return default_cache_dir()


def _refuse(ref: str, why: str) -> WireError:
    return WireError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"model reference {ref!r} is refused: {why}; send a file or directory name relative to the node's "
        "--model-dir, or a registry name (see `edgeshard models list`)",
    )


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def check_relative_ref(ref: str) -> PurePosixPath:
    """The reference as a relative path, or WireError when it is empty, absolute, or climbs with `..`."""
    if not ref or not ref.strip():
        raise _refuse(ref, "it is empty")
    if "\x00" in ref:
        raise _refuse(ref, "it contains a NUL byte")
    # bounded before any file system call: an over-long name is ENAMETOOLONG there, not a typed refusal
    if len(ref) > MAX_REF_CHARS or any(len(p.encode()) > 255 for p in PurePosixPath(ref).parts):
        raise _refuse(
            ref[:80] + "...", f"it is longer than {MAX_REF_CHARS} characters or a name exceeds 255 bytes"
        )
    posix, windows = PurePosixPath(ref), PureWindowsPath(ref)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ref.startswith(("/", "\\", "~")):
        raise _refuse(ref, "absolute paths are not accepted")
    if ".." in posix.parts or ".." in windows.parts:
        raise _refuse(ref, "'..' may not appear in it")
    return posix


def _check_index(ref: str, directory: Path, root: Path) -> None:
    """A sharded HF checkpoint names its files in model.safetensors.index.json: each must stay inside too."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise _refuse(ref, f"its {index.name} is larger than {MAX_INDEX_BYTES >> 20} MiB")
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _refuse(ref, f"its {index.name} is not a valid index ({type(e).__name__})") from None
    for name in names:
        if not isinstance(name, str):
            raise _refuse(ref, f"its {index.name} names a file by a {type(name).__name__}")
        try:
            check_relative_ref(name)
        except WireError:
            raise _refuse(ref, f"its {index.name} names {name!r}, not a plain relative file name") from None
        if not _inside((directory / name).resolve(), root):
            raise _refuse(ref, f"its {index.name} names {name!r}, outside the model directory")


def resolve_in_model_dir(ref: str, model_dir: str | os.PathLike[str], pull: bool = True) -> Path:
    """The checkpoint path `ref` names inside `model_dir`; see `_resolve`. File system failures on the way
    (a symlink loop, a directory it may not read) are refusals too, never an untyped error."""
    try:
        return _resolve(ref, model_dir, pull)
    except (OSError, RuntimeError) as e:  # RuntimeError: Path.resolve() on a symlink loop (Python < 3.13)
        raise _refuse(ref, f"it cannot be resolved ({type(e).__name__}: {e})") from None


def _resolve(ref: str, model_dir: str | os.PathLike[str], pull: bool = True) -> Path:
    """The checkpoint path `ref` names inside `model_dir` (resolving symlinks), pulling registry names.

    Raises WireError: INVALID_ARGUMENT for a reference that is absolute, climbs out, or resolves outside the
    directory; NOT_FOUND for one that names nothing there and is not a registry name.
    """
    rel = check_relative_ref(ref)
    root = Path(model_dir).expanduser().resolve()
    candidate = (root / rel).resolve()  # follows every symlink on the way
    if not _inside(candidate, root):
        raise _refuse(ref, f"it resolves to {candidate}, outside the model directory {root}")
    if candidate.exists():
        if candidate.is_dir():
            for child in candidate.iterdir():  # an HF directory: its files may be symlinks too
                if not _inside(child.resolve(), root):
                    raise _refuse(ref, f"{child.name} inside it links outside the model directory")
            _check_index(ref, candidate, root)
        return candidate
    from edgeshard.node.weights import registry as models

    if ref in models.REGISTRY and pull:
        try:
            return models.pull(ref, cache_dir=root, progress=False)
        except models.ModelPullError as e:
            raise WireError(grpc.StatusCode.UNAVAILABLE, f"pulling {ref!r} on this node failed: {e}") from e
    raise WireError(
        grpc.StatusCode.NOT_FOUND,
        f"model {ref!r} is not in this node's model directory {root}; copy the file there (or start the node "
        f"with --model-dir pointing at it), or use a registry name ({', '.join(sorted(models.REGISTRY))})",
    )
