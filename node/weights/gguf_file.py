"""A fast, read-only GGUF parser: metadata and tensor views over one memory map.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array, which takes seconds for a
49k-token vocabulary on a small board; a node restarts and reloads often (failures, re-plans), so this reader
parses the header with `struct` in one pass and maps tensor data lazily. It offers the subset of the
`GGUFReader` interface the project uses (`fields[key].contents()`, `tensors[i].name/.tensor_type/.shape/
.data/.data_offset/.n_bytes`), so code written for either works with both.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgeshard.node.errors import EdgeshardError

_SCALARS = {  # GGUF value type -> struct format
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(EdgeshardError, ValueError):
    """The bytes are not a well-formed GGUF file (bad magic, truncated header, unknown value type)."""


@dataclass
class Field:
    """One metadata key's value."""

    value: Any

    def contents(self) -> Any:
        """The value as Python data (str, int, float, bool, or a list of them)."""
        return self.value


@dataclass
class TensorInfo:
    """One tensor: ggml shape (ne0 first), type, and its bytes in the file."""

    name: str
    shape: tuple[int, ...]  # ggml order: (in_features, out_features) for a matrix
    tensor_type: GGMLQuantizationType
    data_offset: int  # absolute byte offset in the file
    n_bytes: int
    _buf: Any = None

    @property
    def data(self) -> np.ndarray:
        """A read-only view: floats shaped (out, in) for F32/F16, else uint8 (rows, bytes_per_row)."""
        rows = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=self.n_bytes, offset=self.data_offset)
        if self.tensor_type == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(tuple(reversed(self.shape)))
        if self.tensor_type == GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(tuple(reversed(self.shape)))
        return raw.reshape(rows, self.n_bytes // rows)


class GGUFFile:
    """A GGUF file opened read-only: `fields` (metadata) and `tensors` (lazy views)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise GGUFFormatError(f"{self.path}: the GGUF header is truncated or corrupt ({e})") from e

    def _read(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("Q")
        if n > len(self._buf) - self._pos:
            raise GGUFFormatError(f"{self.path}: a string of {n} bytes runs past the end of the file")
        s = self._buf[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._read("I"), self._read("Q")
            if etype in _NUMPY:  # numeric arrays in one copy, not element by element
                arr = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype} at byte {self._pos}")

    def _parse(self) -> None:
        if self._buf[:4] != b"GGUF":
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {bytes(self._buf[:4])!r})")
        self._pos = 4
        self.version = self._read("I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = Field(self._value(self._read("I")))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._read("Q") for _ in range(self._read("I")))
            ttype, offset = self._read("I"), self._read("Q")
            infos.append((name, dims, ttype, offset))
        align = int(self.fields.get("general.alignment", Field(32)).value)
        data_start = (self._pos + align - 1) // align * align
        self.tensors: list[TensorInfo] = []
        for name, dims, ttype, offset in infos:
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError as e:
                raise GGUFFormatError(f"{self.path}: tensor {name} has unknown ggml type {ttype}") from e
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(dims)) // block * type_size
            self.tensors.append(TensorInfo(name, dims, qtype, data_start + offset, n_bytes, self._buf))
