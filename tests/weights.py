"""Weight sources the quantization and cost tests build layers from (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


class FloatSrc:
    """A float weight as a WeightSource (node/weights/checkpoint.py): what a safetensors checkpoint hands the loader,
    no GGUF blocks."""

    def __init__(self, w: torch.Tensor, name: str = "w") -> None:
        self.name, self.shape, self.ggml_type, self._w = name, tuple(w.shape), None, w

    def raw(self):
        raise AssertionError("raw() must not be used for non-GGUF sources")

    def dense(self) -> torch.Tensor:
        return self._w
