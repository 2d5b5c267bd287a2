"""A model as a manifest of content-addressed tensors, and a checkpoint over the tensors of one stage.

Weight shipping (docs/shipping.md) moves a stage's tensors, not the model file: the coordinator describes its
GGUF file by a `Manifest` (every tensor's name, ggml type, shape, byte size and SHA-256 of its raw bytes, and
the metadata that configures the model), a node keeps the tensors it was sent under their hashes
(node/weights/cache.py), and `SliceCheckpoint` presents them to the loader exactly as `GGUFCheckpoint`
presents the file: same names, same raw blocks, same config. A stage loaded from a slice is therefore
bit-identical to one loaded from the whole file.

The tokenizer's arrays are left out of the manifest: nodes never tokenize (the coordinator does), and the
vocabulary size they would give is written as `<arch>.vocab_size` instead.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from edgeshard.node.model.config import ShardSpec
from edgeshard.node.weights.checkpoint import CheckpointError, GGUFCheckpoint
from edgeshard.node.weights.gguf_file import Field, GGUFFile, TensorInfo
from edgeshard.node.wire import edgeshard_pb2 as pb

_KEEP_TOKENIZER = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the model file: its raw bytes are named by their SHA-256."""

    name: str  # GGUF name
    ggml_type: int
    shape: tuple[int, ...]  # ggml order
    nbytes: int
    sha256: str


@dataclass
class Manifest:
    """A model file as a node needs it: metadata plus every tensor by hash; `id` names the whole."""

    model: str
    metadata: dict[str, Any]
    tensors: list[TensorEntry]
    id: str = ""
    _by_name: dict[str, TensorEntry] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}
        digest = hashlib.sha256(self._canonical()).hexdigest()
        if self.id and self.id != digest:
            raise CheckpointError(
                f"slice manifest {self.id[:12]} does not match its contents ({digest[:12]})"
            )
        self.id = digest

    def _canonical(self) -> bytes:
        tensors = [[t.name, t.ggml_type, list(t.shape), t.nbytes, t.sha256] for t in self.tensors]
        return json.dumps({"metadata": self.metadata, "tensors": tensors}, sort_keys=True).encode()

    def tensor(self, name: str) -> TensorEntry:
        return self._by_name[name]

    @property
    def num_layers(self) -> int:
        return int(self.metadata[f"{self.metadata['general.architecture']}.block_count"])

    def stage_tensors(self, spec: ShardSpec) -> list[TensorEntry]:
        """The tensors a stage over `spec` reads: its blocks' tensors, the embedding on the first stage, the
        final norm and head on the last (the embedding again when the head is tied to it)."""
        out: list[TensorEntry] = []
        for t in self.tensors:
            m = re.match(r"blk\.(\d+)\.", t.name)
            if m and spec.start_layer <= int(m.group(1)) < spec.end_layer:
                out.append(t)
        names = {t.name for t in out}

        def add(name: str) -> None:
            if name in self._by_name and name not in names:
                out.append(self._by_name[name])
                names.add(name)

        if spec.is_first:
            add("token_embd.weight")
        if spec.is_last:
            add("output_norm.weight")
            add("output.weight" if "output.weight" in self._by_name else "token_embd.weight")
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "model": self.model,
                "metadata": self.metadata,
                "tensors": [t.__dict__ for t in self.tensors],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        tensors = [TensorEntry(**{**t, "shape": tuple(t["shape"])}) for t in d["tensors"]]
        return cls(d["model"], d["metadata"], tensors, d["id"])

    def to_pb(self) -> pb.SliceManifest:
        return pb.SliceManifest(
            id=self.id,
            model=self.model,
            metadata_json=json.dumps(self.metadata, sort_keys=True).encode(),
            tensors=[
                pb.SliceTensor(
                    name=t.name, ggml_type=t.ggml_type, shape=t.shape, nbytes=t.nbytes, sha256=t.sha256
                )
                for t in self.tensors
            ],
        )

    @classmethod
    def from_pb(cls, m: pb.SliceManifest) -> Manifest:
        """The manifest a coordinator sent; CheckpointError when it is malformed or its id does not match."""
        try:
            metadata = json.loads(m.metadata_json)
        except ValueError as e:
            raise CheckpointError(f"slice manifest {m.id[:12]}: metadata is not JSON ({e})") from None
        if not isinstance(metadata, dict) or "general.architecture" not in metadata:
            raise CheckpointError(f"slice manifest {m.id[:12]}: metadata names no general.architecture")
        tensors = []
        for t in m.tensors:
            if not _HEX64.match(t.sha256):
                raise CheckpointError(f"slice manifest {m.id[:12]}: tensor {t.name!r} has no valid sha256")
            try:
                qtype = GGMLQuantizationType(t.ggml_type)
            except ValueError:
                raise CheckpointError(
                    f"slice manifest: tensor {t.name!r} has unknown ggml type {t.ggml_type}"
                ) from None
            if t.nbytes != _nbytes(qtype, tuple(t.shape)):
                raise CheckpointError(
                    f"slice manifest: tensor {t.name!r} has {t.nbytes} bytes, not its shape's"
                )
            tensors.append(
                TensorEntry(t.name, t.ggml_type, tuple(int(s) for s in t.shape), t.nbytes, t.sha256)
            )
        return cls(m.model, metadata, tensors, m.id)


def _nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * type_size


def _metadata(reader: GGUFFile) -> dict[str, Any]:
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    meta.update({k: reader.fields[k].contents() for k in _KEEP_TOKENIZER if k in reader.fields})
    arch = meta.get("general.architecture")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if f"{arch}.vocab_size" not in meta and tokens is not None:
        meta[f"{arch}.vocab_size"] = len(tokens.contents())  # what the config would count from the tokens
    return meta


_MANIFESTS: dict[tuple[str, int, int, str], Manifest] = {}


def build_manifest(
    path: str | os.PathLike, model: str, on_bytes: Callable[[int], None] | None = None
) -> Manifest:
    """The manifest of a GGUF file: hashes every tensor once (memoized per file size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, model)
    if key in _MANIFESTS:
        return _MANIFESTS[key]
    if p.is_dir():
        raise CheckpointError(f"{p}: only GGUF files can be shipped to nodes (not Hugging Face directories)")
    reader = GGUFFile(p)
    tensors = []
    for t in reader.tensors:
        view = memoryview(reader._buf)[t.data_offset : t.data_offset + t.n_bytes]
        tensors.append(
            TensorEntry(
                t.name,
                int(t.tensor_type),
                tuple(int(s) for s in t.shape),
                t.n_bytes,
                hashlib.sha256(view).hexdigest(),
            )
        )
        view.release()
        if on_bytes is not None:
            on_bytes(t.n_bytes)
    manifest = Manifest(model, _metadata(reader), tensors)
    _MANIFESTS[key] = manifest
    return manifest


def tensor_bytes(path: str | os.PathLike, name: str) -> memoryview:
    """The raw bytes of tensor `name` in the GGUF file at `path` (a view of a memory map)."""
    reader = GGUFFile(path)
    for t in reader.tensors:
        if t.name == name:
            return memoryview(reader._buf)[t.data_offset : t.data_offset + t.n_bytes]
    raise CheckpointError(f"{path}: no tensor {name!r}")


class _CachedTensor(TensorInfo):
    """A tensor whose bytes are a file of the slice cache, mapped when read and unmapped when dropped."""

    def __init__(self, entry: TensorEntry, file: Path | None) -> None:
        super().__init__(entry.name, entry.shape, GGMLQuantizationType(entry.ggml_type), 0, entry.nbytes)
        self.file = file

    @property
    def data(self) -> np.ndarray:
        if self.file is None:
            raise CheckpointError(
                f"tensor {self.name} is not in this node's slice cache; the coordinator ships a stage's tensors "
                "before loading it (deploy again)"
            )
        try:
            with open(self.file, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"tensor {self.name}: cannot read cached {self.file} ({e})") from e
        if len(self._buf) != self.n_bytes:
            raise CheckpointError(
                f"tensor {self.name}: cached {self.file} has {len(self._buf)} bytes, not {self.n_bytes}"
            )
        try:
            return TensorInfo.data.fget(self)
        finally:
            self._buf = None  # the array keeps the map alive as long as it needs it


@dataclass
class _SliceReader:
    """What GGUFCheckpoint reads from a GGUFFile: `fields` and `tensors` (all of the model's, by name)."""

    fields: dict[str, Field]
    tensors: list[TensorInfo]


class SliceCheckpoint(GGUFCheckpoint):
    """The tensors of a manifest that are in the slice cache, as a GGUF checkpoint.

    `names()` lists every tensor of the model (the loader decides tied heads and biases by name, and the
    default format by layer 0's types, all of which the manifest knows); reading one that is not cached is a
    `CheckpointError` naming it.
    """

    def __init__(self, manifest: Manifest, files: dict[str, Path], label: str | None = None) -> None:
        self.path = Path(label or f"{manifest.model} (slice {manifest.id[:12]})")
        self.manifest = manifest
        tensors = [_CachedTensor(t, files.get(t.sha256)) for t in manifest.tensors]
        self.reader = _SliceReader({k: Field(v) for k, v in manifest.metadata.items()}, tensors)
        self.metadata = dict(manifest.metadata)
        self.config = self._config()
        from edgeshard.node.weights.checkpoint import gguf_to_hf_name

        self._tensors = {hf: t for t in tensors if (hf := gguf_to_hf_name(t.name)) is not None}


def manifest_wants(manifest: Manifest, spec: ShardSpec) -> list[str]:
    """SHA-256s of the tensors a stage needs (without repeats)."""
    return list(dict.fromkeys(t.sha256 for t in manifest.stage_tensors(spec)))


def stage_bytes(entries: Iterable[TensorEntry]) -> int:
    """Bytes of distinct tensors (by hash)."""
    return sum({t.sha256: t.nbytes for t in entries}.values())
