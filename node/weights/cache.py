"""The slice cache: shipped tensors on a node's disk, named by their SHA-256, evicted least recently used.

Layout under `<model-dir>/.edgeshard-slices/`:

    objects/<sha256>       the raw bytes of one tensor (ggml blocks as stored in the GGUF file)
    manifests/<id>.json    the manifests the node was told about (node/weights/slice.py)
    partial/<sha256>.part  a tensor being received; admitted (renamed into objects/) once its hash matches;
                           kept when a stream breaks inside it: the next stream resumes at its size
    index.json             per object: size, mtime, last use (for LRU and for cheap re-verification)

Content addressing makes a cached tensor valid for any model file that contains the same bytes, and makes
verification a hash check. An object whose size or mtime differ from what the index recorded when it was
admitted is hashed again before it is reported as held; a mismatch is dropped, so the coordinator sends it
again. `--cache-limit` bounds the bytes in objects/: admitting a tensor evicts the least recently used
objects that no loaded shard uses (`pin`), and refuses the tensor when even that cannot make room.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from edgeshard.node.errors import EdgeshardError
from edgeshard.node.weights.slice import Manifest, SliceCheckpoint

CACHE_DIRNAME = ".edgeshard-slices"
PARTIAL_MAX_AGE_S = 24 * 3600  # a partly received tensor older than this is dropped at start


class CacheFullError(EdgeshardError):
    """A tensor does not fit under --cache-limit even after evicting everything unpinned."""


class HashMismatchError(EdgeshardError):
    """Received bytes do not hash to the tensor's SHA-256."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class SliceCache:
    """The slice cache of one node (thread-safe; file work is meant to run in worker threads)."""

    def __init__(self, model_dir: str | os.PathLike, limit: int = 0) -> None:
        self.root = Path(model_dir).expanduser() / CACHE_DIRNAME
        self.limit = limit  # bytes (0: no limit)
        self.objects = self.root / "objects"
        self.partial = self.root / "partial"
        self.manifests = self.root / "manifests"
        for d in (self.objects, self.partial, self.manifests):
            d.mkdir(parents=True, exist_ok=True)
        for part in self.partial.iterdir():  # a tensor cut off (stream or node) resumes where it stopped...
            try:
                if (
                    time.time() - part.stat().st_mtime > PARTIAL_MAX_AGE_S
                ):  # ...unless nobody came back for it
                    part.unlink(missing_ok=True)
            except OSError:
                pass
        self._lock = threading.RLock()
        self._pinned: dict[str, set[str]] = {}  # owner (e.g. "loaded", "incoming") -> hashes
        self.loaded = ""  # manifest id of the shard the node has installed from this cache ("": none)
        self._index = self._read_index()

    # ------------------------------------------------------------------------------------------ index

    def _read_index(self) -> dict[str, dict]:
        try:
            index = json.loads((self.root / "index.json").read_text())
            if not isinstance(index, dict):
                index = {}
        except (OSError, ValueError):
            index = {}
        present = {p.name for p in self.objects.iterdir()}
        index = {k: v for k, v in index.items() if k in present and isinstance(v, dict)}
        for name in present - set(index):  # objects without a record (index lost): verify before use
            index[name] = {"size": -1, "mtime_ns": -1, "used": 0.0}
        return index

    def _write_index(self) -> None:
        # a name of this process and moment: nodes sharing one model dir (local clusters) write it at once
        tmp = self.root / f"index.json.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        tmp.write_text(json.dumps(self._index))
        os.replace(tmp, self.root / "index.json")

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(max(0, r["size"]) for r in self._index.values())

    def path(self, sha: str) -> Path:
        return self.objects / sha

    # ------------------------------------------------------------------------------------ manifests

    def save_manifest(self, manifest: Manifest) -> None:
        target = self.manifests / f"{manifest.id}.json"
        if not target.exists():
            # a name of this process and moment: concurrent SliceStatus calls (a coordinator asking every
            # node of its plan which tensors they hold) save the same manifest at once
            tmp = target.with_name(f"{target.stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
            tmp.write_text(manifest.to_json())
            os.replace(tmp, target)

    def manifest(self, manifest_id: str) -> Manifest | None:
        if len(manifest_id) != 64 or not all(c in "0123456789abcdef" for c in manifest_id):
            return None
        try:
            return Manifest.from_json((self.manifests / f"{manifest_id}.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ----------------------------------------------------------------------------------- queries

    def have(self, hashes: Iterable[str]) -> list[str]:
        """Of `hashes`, those held and verified (an object changed since admission is hashed again; a
        mismatch is dropped). Marks them used."""
        out = []
        with self._lock:
            for sha in dict.fromkeys(hashes):
                rec = self._index.get(sha)
                if rec is None:
                    continue
                p = self.path(sha)
                try:
                    st = p.stat()
                except OSError:
                    self._index.pop(sha, None)
                    continue
                if (st.st_size, st.st_mtime_ns) != (rec["size"], rec["mtime_ns"]):
                    if sha256_file(p) != sha:
                        self._drop(sha)
                        continue
                    rec.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
                rec["used"] = time.time()
                out.append(sha)
            self._write_index()
        return out

    def files(self, hashes: Iterable[str]) -> dict[str, Path]:
        """Paths of the held objects among `hashes`."""
        with self._lock:
            return {s: self.path(s) for s in hashes if s in self._index}

    def open_slice(self, manifest: Manifest) -> SliceCheckpoint:
        """A checkpoint over what this cache holds of `manifest`."""
        return SliceCheckpoint(manifest, self.files(t.sha256 for t in manifest.tensors))

    def pin(self, owner: str, hashes: Iterable[str]) -> None:
        """Keep `hashes` from eviction for `owner` (replacing what it pinned before)."""
        with self._lock:
            self._pinned[owner] = set(hashes)

    def unpin(self, owner: str) -> None:
        with self._lock:
            self._pinned.pop(owner, None)

    # --------------------------------------------------------------------------------- admission

    def begin(self, sha: str) -> Path:
        """The partial file a tensor is received into (truncated)."""
        p = self.partial / f"{sha}.part"
        p.write_bytes(b"")
        return p

    def partial_bytes(self, hashes: Iterable[str]) -> dict[str, int]:
        """Of `hashes`, those received in part (a stream broke inside them): sha -> bytes held."""
        out = {}
        for sha in dict.fromkeys(hashes):
            try:
                n = (self.partial / f"{sha}.part").stat().st_size
            except OSError:
                continue
            if n:
                out[sha] = n
        return out

    def resume(self, sha: str, offset: int) -> tuple[Path, hashlib._Hash]:
        """The partial file of `sha` cut back to its first `offset` bytes, and a SHA-256 over those bytes (read
        again from disk: the tensor's hash is checked over all of it, whichever stream brought which part).
        ValueError when fewer than `offset` bytes are held."""
        p = self.partial / f"{sha}.part"
        digest = hashlib.sha256()
        with open(p, "r+b") as f:
            if os.fstat(f.fileno()).st_size < offset:
                raise ValueError(f"tensor {sha[:12]}: {offset} bytes to resume from but fewer are held")
            f.truncate(offset)
            left = offset
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise ValueError(f"tensor {sha[:12]}: the partial file ended early")
                digest.update(chunk)
                left -= len(chunk)
        return p, digest

    def admit(self, sha: str, part: Path, nbytes: int, digest: str | None = None) -> None:
        """Verify a received tensor and move it into the cache; HashMismatchError drops it, CacheFullError
        when it cannot fit under the limit. `digest`: the SHA-256 the receiver computed as the bytes came in
        (None: hash the file)."""
        try:
            if part.stat().st_size != nbytes or (digest or sha256_file(part)) != sha:
                raise HashMismatchError(f"tensor {sha[:12]}: received bytes do not match its SHA-256")
            with self._lock:
                self._make_room(nbytes, keep=sha)
                target = self.path(sha)
                os.replace(part, target)
                st = target.stat()
                self._index[sha] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "used": time.time()}
                self._write_index()
        finally:
            part.unlink(missing_ok=True)

    def _make_room(self, nbytes: int, keep: str) -> None:
        if not self.limit:
            return
        if nbytes > self.limit:
            raise CacheFullError(f"a tensor of {nbytes} bytes is larger than --cache-limit {self.limit}")
        pinned = set().union(*self._pinned.values(), {keep})
        used = self.total_bytes - max(0, self._index.get(keep, {}).get("size", 0))
        for sha, _ in sorted(self._index.items(), key=lambda kv: kv[1]["used"]):
            if used + nbytes <= self.limit:
                break
            if sha not in pinned:
                used -= max(0, self._index[sha]["size"])
                self._drop(sha)
        if used + nbytes > self.limit:
            raise CacheFullError(
                f"the slice cache needs {used + nbytes} bytes but --cache-limit is {self.limit}, and the "
                f"{used} bytes held belong to the shard being loaded or in use; raise --cache-limit or give "
                "this node fewer layers"
            )

    def _drop(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)
        self._index.pop(sha, None)

    # ----------------------------------------------------------------------------------- listing

    def listing(self) -> list[dict]:
        """The manifests this cache knows, with how much of each it holds (see `list_slices`)."""
        with self._lock:
            return list_slices(self.root.parent)


def list_slices(model_dir: str | os.PathLike) -> list[dict]:
    """The model slices held under `model_dir` (read only: safe next to a running node), one row per manifest:
    manifest id, model, tensors and bytes held, the whole model's bytes, and the layer range held."""
    root = Path(model_dir).expanduser() / CACHE_DIRNAME
    try:
        held = {p.name: p.stat().st_size for p in (root / "objects").iterdir()}
    except OSError:
        return []
    rows = []
    for p in sorted((root / "manifests").glob("*.json")):
        try:
            m = Manifest.from_json(p.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        have = [t for t in m.tensors if t.sha256 in held]
        layers = sorted({int(t.name.split(".")[1]) for t in have if t.name.startswith("blk.")})
        rows.append(
            {
                "manifest": m.id,
                "model": m.model,
                "tensors": len({t.sha256 for t in have}),
                "bytes": sum({t.sha256: t.nbytes for t in have}.values()),
                "model_bytes": sum({t.sha256: t.nbytes for t in m.tensors}.values()),
                "layers": f"{layers[0]}-{layers[-1]}" if layers else "",
            }
        )
    return rows
