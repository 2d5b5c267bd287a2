"""Int4 and int8 linear layers on the integer dot-product kernels (node/lowbit/csrc/dot.c) for CPUs without AMX:
x86 AVX2 / AVX-512 (VNNI) laptops and servers, ARM NEON boards (sdot where present).

Same math and formats as `quant.Int4Linear` / `quant.Int8Linear` (w = q * scale + min per 32; w = q * scale
per row), so they subclass them; `isinstance`, `weight_format` and shard metadata treat them alike. They hold
the same bytes as the AMX layers (node/lowbit/amx.py: 4-bit codes plus fp16 scale and min per 32; int8 codes plus
a bf16 row scale) in dot.c's layout, and record the kernel set that runs them (`kernel`), so a process can
hold layers of several sets (tests force each set through EDGESHARD_KERNELS).

Numerics: every input row is quantized to int8 per 32 (as llama.cpp does for its CPU decode) before the
integer products: ~0.3-0.5% relative error against the float product of the same weights, well below int4's
own ~2%, and each row's result is bit-identical whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from edgeshard.node.lowbit import native
from edgeshard.node.lowbit.amx import _forward, _pad_rows, hold_packed_int4, pack_int4_rows
from edgeshard.node.lowbit.layers import (
    GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    _bias_buffer,
    _FixedFormat,
)


class DotInt4Linear(Int4Linear):
    """y = x @ W.T (+ bias), W in 4 bits (group 32, fp16 scale and min), on dot.c's kernels.

    Holds `codes` uint8 (N/16, in/32, 256) and `params` float16 (N/16, in/32, 2, 16), N = out_features rounded
    up to 16. Input and output are bf16.
    """

    def __init__(self, codes: torch.Tensor, params: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, kernel: str | None = None) -> None:  # fmt: skip
        hold_packed_int4(self, codes, params, in_features, out_features, bias)
        self.kernel = kernel or native.kernel_set()
        native.variant_library(self.kernel)  # fail here, not at the first forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) bf16 -> (..., out) bf16, any number of rows."""
        buf = self._buffers  # see Int4Linear.forward
        return _forward(
            self,
            x,
            lambda x2: native.dot_int4_mm(self.kernel, x2, buf["codes"], buf["params"], self.out_features),
        )

    @classmethod
    def from_codes(
        cls, rows: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], in_features: int, out_features: int,
        bias: torch.Tensor | None = None,
    ) -> DotInt4Linear:  # fmt: skip
        """Row chunks of (q uint8 (r, in) in 0..15, scale f32 (r, in/32), min f32 (r, in/32)), W = q*scale + min."""
        codes, params = pack_int4_rows(rows, out_features, native.pack_dot_int4)
        return cls(codes, params, in_features, out_features, bias)

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as float32: q * scale + min with the layer's float16 scale and min."""
        nb, groups = self.codes.shape[:2]
        q = native.unpack_dot_int4(self.codes).float()
        scale, minv = self.params.float().permute(0, 3, 1, 2).reshape(nb * 16, groups, 2).unbind(-1)
        w = q.view(nb * 16, groups, GROUP_SIZE) * scale[..., None] + minv[..., None]
        return w.flatten(1)[: self.out_features]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}"


class DotInt8Linear(Int8Linear):
    """y = x @ W.T (+ bias), W in int8 with one bf16 scale per output row, on dot.c's kernels.

    Holds `codes` int8 (N/16, in/32, 512) in dot.c's order and `scales` bf16 (out,).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None, kernel: str | None = None) -> None:  # fmt: skip
        _FixedFormat.__init__(self)
        out_features = scales.shape[0]
        blocks, groups = native.padded(out_features) // native.BLOCK_N, in_features // GROUP_SIZE
        if codes.dtype != torch.int8 or tuple(codes.shape) != (blocks, groups, 512):
            raise ValueError(
                f"codes must be int8 ({blocks}, {groups}, 512), got {codes.dtype} {tuple(codes.shape)}"
            )
        self.kernel = kernel or native.kernel_set()
        native.variant_library(self.kernel)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = in_features  # one scale per row
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", _bias_buffer(bias, out_features, torch.bfloat16))

    @classmethod
    def from_rows(
        cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> DotInt8Linear:
        """int8 codes (out, in) and row scales (out,), in % 32 == 0."""
        out_f, in_f = q.shape
        return cls(native.pack_dot_int8(_pad_rows(q, native.padded(out_f))), scales, in_f, bias)

    @classmethod
    def from_row_chunks(
        cls, rows: Iterator[tuple[torch.Tensor, torch.Tensor]], out_features: int,
        bias: torch.Tensor | None = None,
    ) -> DotInt8Linear:  # fmt: skip
        """Row chunks of (int8 codes (r, in), row scales (r,)), packed one chunk at a time into preallocated
        codes: `from_rows` on the collected weight held it twice (collected and packed), which for a 1.5B
        model's int8 head (32000 x 2048) was 65 MB more at a node's peak while loading."""
        codes = scales = None
        r0 = 0
        for q, s in rows:
            r, in_f = q.shape
            if r0 % native.BLOCK_N or r0 + r > out_features:
                raise ValueError(
                    f"int8 codes: a row chunk at row {r0} of {r} rows does not fit whole {native.BLOCK_N}-row "
                    f"blocks of {out_features} rows"
                )
            if codes is None:
                blocks = native.padded(out_features) // native.BLOCK_N
                codes = torch.empty((blocks, in_f // GROUP_SIZE, 512), dtype=torch.int8)
                scales = torch.empty(out_features, dtype=s.dtype)
            c = native.pack_dot_int8(_pad_rows(q, native.padded(r)))
            codes[r0 // native.BLOCK_N : r0 // native.BLOCK_N + c.shape[0]] = c
            scales[r0 : r0 + r] = s
            r0 += r
        if codes is None or r0 != out_features:
            raise ValueError(f"int8 codes: got {r0} rows from the source, expected {out_features}")
        return cls(codes, scales, in_f, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) bf16 -> (..., out) bf16, any number of rows."""
        buf = self._buffers
        return _forward(self, x, lambda x2: native.dot_int8_mm(self.kernel, x2, buf["codes"], buf["scales"]))

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as float32 (int8 codes times the bf16 row scales)."""
        q = native.unpack_dot_int8(self.codes)
        return q[: self.out_features].float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What dot.c does to input rows, for tests' exact reference: bf16 (M, K) -> (int8 codes (M, K) as
    float32, per-32 scales (M, K/32)): scale = amax / 127, code = round-half-even(x * (127 / amax)).
    In numpy's float32, whose division is IEEE's as in C (torch's `127 / t` is not always the same bits)."""
    g = x.float().numpy().reshape(*x.shape[:-1], -1, GROUP_SIZE)
    amax = np.abs(g).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.rint(g * inv), -127, 127).reshape(x.shape)
    return torch.from_numpy(q.astype(np.float32)), torch.from_numpy((amax / np.float32(127.0))[..., 0])
