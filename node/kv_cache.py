"""Per-sequence KV cache for the layers of one stage.

One `KVCache` holds the keys and values of one sequence for the layers a stage runs. Buffers grow in steps
(like mlx-lm's cache) so a short chat does not reserve the whole context. Writing at a position below the
current offset rewrites the tail (a retried or replayed step), which is how recovery re-sends positions.
"""

from __future__ import annotations

import torch

GROW_STEP = 256  # positions added each time a buffer fills


class KVCache:
    """Keys and values of one sequence, for `num_layers` consecutive layers of a stage."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        max_len: int,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.max_len = max_len  # the context length; writing past it is an error
        self.offset = 0  # positions [0, offset) are valid
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each (Hkv, capacity, hd)
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold before they grow."""
        k = self.keys[0]
        return 0 if k is None else k.shape[1]

    def nbytes(self) -> int:
        """Bytes the buffers hold now."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def _ensure(self, layer: int, end: int) -> None:
        k = self.keys[layer]
        if k is not None and k.shape[1] >= end:
            return
        new_cap = min(self.max_len, ((end + GROW_STEP - 1) // GROW_STEP) * GROW_STEP)
        shape = (self.num_kv_heads, new_cap, self.head_dim)
        new_k = torch.zeros(shape, dtype=self.dtype)
        new_v = torch.zeros(shape, dtype=self.dtype)
        if k is not None:
            n = k.shape[1]
            new_k[:, :n] = k
            new_v[:, :n] = self.values[layer]
        self.keys[layer], self.values[layer] = new_k, new_v

    def update_and_fetch(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (Hkv, T, hd) at positions [start, start+T) of `layer`; return keys/values [0, start+T)."""
        end = start + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"sequence of {end} positions exceeds the context length {self.max_len}")
        if start > self.offset:
            raise ValueError(f"position {start} skips ahead of the cache (holds {self.offset} positions)")
        self._ensure(layer, end)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, start:end] = k
        values[:, start:end] = v
        return keys[:, :end], values[:, :end]

    def advance(self, start: int, length: int) -> None:
        """Record that positions [start, start+length) are now valid in every layer."""
        self.offset = start + length

    def trim(self, n: int) -> int:
        """Forget the last n positions; returns how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def free(self) -> None:
        """Release the buffers (the sequence is finished or cancelled)."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.offset = 0
