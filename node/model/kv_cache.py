"""Per-sequence KV cache for the layers of one stage.

One `KVCache` holds the keys and values of one sequence for the layers a stage runs. Buffers grow in steps
(like mlx-lm's cache) so a short chat does not reserve the whole context. Writing at a position below the
current offset rewrites the tail (a retried or replayed step), which is how recovery re-sends positions.

All layers share one buffer, (layers, 2, Hkv, capacity, hd): a layer's keys and values sit together, so a
decode step writes both with one copy and fetches both with one slice (at batch 1 every op costs
microseconds, per layer), and the native decode path (node/lowbit/csrc/decode.c) reaches every layer of a sequence
from one address. Every step writes every layer, so the layers grow together.
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
        self.buffer: torch.Tensor | None = None  # (layers, 2, Hkv, capacity, hd): keys, values per layer

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold before they grow."""
        return 0 if self.buffer is None else self.buffer.shape[3]

    def nbytes(self) -> int:
        """Bytes the buffers hold now."""
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def _check(self, start: int, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"sequence of {end} positions exceeds the context length {self.max_len}")
        if start > self.offset:
            raise ValueError(f"position {start} skips ahead of the cache (holds {self.offset} positions)")

    def grow(self, end: int) -> torch.Tensor:
        """The whole (layers, 2, Hkv, capacity, hd) buffer, grown to hold at least `end` positions."""
        buf = self.buffer
        if buf is not None and buf.shape[3] >= end:
            return buf
        new_cap = min(self.max_len, ((end + GROW_STEP - 1) // GROW_STEP) * GROW_STEP)
        shape = (self.num_layers, 2, self.num_kv_heads, new_cap, self.head_dim)
        new = torch.zeros(shape, dtype=self.dtype)
        if buf is not None:
            new[:, :, :, : buf.shape[3]] = buf
        self.buffer = new
        return new

    def reserve(self, start: int, length: int = 1) -> torch.Tensor:
        """The whole buffer, grown to hold positions [start, start+length), which must continue the cache
        (start <= offset) within the context; the caller writes them (update_and_fetch_kv, node/lowbit/csrc/decode.c)."""
        self._check(start, start + length)
        return self.grow(start + length)

    def update_and_fetch_kv(self, layer: int, start: int, kv: torch.Tensor) -> torch.Tensor:
        """Write kv (2, Hkv, T, hd), keys then values, at positions [start, start+T) of `layer`; return the
        keys and values of positions [0, start+T) as one view (2, Hkv, start+T, hd)."""
        end = start + kv.shape[2]
        buf = self.reserve(start, kv.shape[2])[layer]
        buf[:, :, start:end] = kv
        return buf[:, :, :end]

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
        self.buffer = None
        self.offset = 0
