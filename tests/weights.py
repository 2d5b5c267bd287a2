"""Weight sources and a tiny model config the tests build layers and stages from (importable: pytest puts tests/ on
sys.path)."""

from __future__ import annotations

import torch

from edgeshard.node.model.config import ModelConfig

# a two-layer model small enough for ring and recovery tests that build stages in process
TINY = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
)


class FloatSrc:
    """A float weight as a WeightSource (node/weights/checkpoint.py): what a safetensors checkpoint hands the loader,
    no GGUF blocks."""

    def __init__(self, w: torch.Tensor, name: str = "w") -> None:
        self.name, self.shape, self.ggml_type, self._w = name, tuple(w.shape), None, w

    def raw(self):
        raise AssertionError("raw() must not be used for non-GGUF sources")

    def dense(self) -> torch.Tensor:
        return self._w
