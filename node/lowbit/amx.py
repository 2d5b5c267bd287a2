"""Int4 and int8 linear layers on the node's AMX kernels (node/lowbit/native.py, node/lowbit/csrc/lowbit.c).

Same math as `quant.Int4Linear` / `quant.Int8Linear` (w = q * scale + min per group of 32; w = q * scale per
row), so they subclass them and `isinstance` checks, `weight_format` and shard metadata treat them alike;
they differ in layout (AMX B-tile blocks of 16 output rows x 32 inputs, see lowbit.c) and in cost: one
call handles any row count, and 8 rows cost ~1.2x one row instead of ~4x (`python benchmarks/kernels.py`).

`quant.make_linear` builds these when `native.amx()`; on a CPU without AMX it builds node/lowbit/kernels.py's
dot-product layers, and with EDGESHARD_NATIVE=0 (or no usable kernel set) the torch-kernel layers. Int4
scale and min are float16 here (GGUF's own field type: Q4_0 and Q4_1 exact), where the torch kernel rounds
them to bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from edgeshard.node.lowbit import native
from edgeshard.node.lowbit.layers import (
    GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    _bad_input,
    _bias_buffer,
    _FixedFormat,
)


def _pad_rows(t: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    """t with zero (or `value`) rows appended up to `rows`: the kernels work in whole 16-row blocks."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), value)])


def _forward(layer, x: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The AMX layers' forward around their kernel call: input checks, leading dims, bias."""
    if x.dtype != torch.bfloat16 or x.shape[-1] != layer.in_features:
        raise _bad_input(layer, x, layer.in_features, torch.bfloat16)
    y = matmul(x.reshape(-1, layer.in_features).contiguous())  # (M, out) bf16
    if (bias := layer._buffers["bias"]) is not None:
        y = y + bias
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], layer.out_features)


def hold_packed_int4(layer, codes: torch.Tensor, params: torch.Tensor, in_features: int, out_features: int,
                     bias: torch.Tensor | None) -> None:  # fmt: skip
    """Check and register a packed int4 layer's buffers (the AMX and the dot-product layers hold the same
    shapes: codes uint8 (N/16, in/32, 256), params float16 (N/16, in/32, 2, 16), N padded to 16)."""
    _FixedFormat.__init__(layer)
    blocks, groups = native.padded(out_features) // native.BLOCK_N, in_features // GROUP_SIZE
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (blocks, groups, 256):
        raise ValueError(
            f"codes must be uint8 ({blocks}, {groups}, 256), got {codes.dtype} {tuple(codes.shape)}"
        )
    if params.dtype != torch.float16 or tuple(params.shape) != (blocks, groups, 2, native.BLOCK_N):
        raise ValueError(f"params must be float16 ({blocks}, {groups}, 2, 16), got {tuple(params.shape)}")
    layer.in_features, layer.out_features, layer.group_size = in_features, out_features, GROUP_SIZE
    layer.register_buffer("codes", codes.contiguous())
    layer.register_buffer("params", params.contiguous())
    layer.register_buffer("bias", _bias_buffer(bias, out_features, torch.bfloat16))


def pack_int4_rows(
    rows: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], out_features: int, pack: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack row chunks of (q, scale, min) with `pack` (native.pack_int4 or pack_dot_int4) into preallocated
    codes and params, padding the last chunk to a whole 16-row block: q = 0, scale = 1, min = 0, so padding
    weights are 0.

    Chunk by chunk, because 16-row blocks pack independently: collecting the whole unpacked weight first
    held 1.25 bytes per weight (uint8 codes, float32 scale and min) next to the 0.56 packed ones, ~40 MB
    for a 1.5B model's fused gate/up projection, which set the node's peak memory while loading."""
    n = native.padded(out_features)
    codes = params = None
    r0 = 0
    for q, scale, minv in rows:
        r = q.shape[0]
        if r0 % native.BLOCK_N or r0 + r > out_features:
            raise ValueError(
                f"int4 codes: a row chunk at row {r0} of {r} rows does not fit whole {native.BLOCK_N}-row "
                f"blocks of {out_features} rows"
            )
        m = native.padded(r)
        c, p = pack(_pad_rows(q, m), _pad_rows(scale.float(), m, 1.0), _pad_rows(minv.float(), m))
        if codes is None:
            codes = c.new_empty((n // native.BLOCK_N, *c.shape[1:]))
            params = p.new_empty((n // native.BLOCK_N, *p.shape[1:]))
        b0 = r0 // native.BLOCK_N
        codes[b0 : b0 + c.shape[0]] = c
        params[b0 : b0 + p.shape[0]] = p
        r0 += r
    if codes is None or r0 != out_features:
        raise ValueError(f"int4 codes: got {r0} rows from the source, expected {out_features}")
    return codes, params


class AmxInt4Linear(Int4Linear):
    """y = x @ W.T (+ bias), W in 4 bits (group 32, float32 scale and min), on the AMX kernel.

    Holds `codes` uint8 (N/16, in/32, 256) and `params` float16 (N/16, in/32, 2, 16), N = out_features
    rounded up to 16 (see lowbit.c). Input and output are bf16.
    """

    kernel = "amx"

    def __init__(self, codes: torch.Tensor, params: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:  # fmt: skip
        hold_packed_int4(self, codes, params, in_features, out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) bf16 -> (..., out) bf16, any number of rows."""
        buf = self._buffers  # see Int4Linear.forward
        return _forward(
            self, x, lambda x2: native.int4_mm(x2, buf["codes"], buf["params"], self.out_features)
        )

    @classmethod
    def from_codes(
        cls, rows: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], in_features: int, out_features: int,
        bias: torch.Tensor | None = None,
    ) -> AmxInt4Linear:  # fmt: skip
        """Row chunks of (q uint8 (r, in) in 0..15, scale f32 (r, in/32), min f32 (r, in/32)), W = q*scale + min."""
        codes, params = pack_int4_rows(rows, out_features, native.pack_int4)
        return cls(codes, params, in_features, out_features, bias)

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as float32: q * scale + min with the layer's float16 scale and min."""
        nb, groups = self.codes.shape[:2]
        c = self.codes.view(nb, groups, 4, 4, 2, 8)  # (nb, g, j, L, part % 2, i): see native.pack_int4
        t = torch.cat([c & 15, c >> 4], dim=4).permute(0, 1, 2, 4, 3, 5)  # (nb, g, j, part, L, i)
        q = t.reshape(nb, groups, 16, native.BLOCK_N, 2).permute(0, 3, 1, 2, 4).reshape(nb * 16, -1).float()
        scale, minv = self.params.float().permute(0, 3, 1, 2).reshape(nb * 16, groups, 2).unbind(-1)
        w = q.view(nb * 16, groups, GROUP_SIZE) * scale[..., None] + minv[..., None]
        return w.flatten(1)[: self.out_features]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", kernel=amx"


class AmxInt8Linear(Int8Linear):
    """y = x @ W.T (+ bias), W in int8 with one bf16 scale per output row, on the AMX kernel.

    Holds `codes` int8 (N/16, in/32, 512) in B-tile order and `scales` bf16 (out,).
    """

    kernel = "amx"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None) -> None:  # fmt: skip
        _FixedFormat.__init__(self)
        out_features = scales.shape[0]
        blocks, groups = native.padded(out_features) // native.BLOCK_N, in_features // GROUP_SIZE
        if codes.dtype != torch.int8 or tuple(codes.shape) != (blocks, groups, 512):
            raise ValueError(
                f"codes must be int8 ({blocks}, {groups}, 512), got {codes.dtype} {tuple(codes.shape)}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.group_size = in_features  # one scale per row
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", _bias_buffer(bias, out_features, torch.bfloat16))

    @classmethod
    def from_rows(
        cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> AmxInt8Linear:
        """int8 codes (out, in) and row scales (out,), in % 32 == 0."""
        out_f, in_f = q.shape
        return cls(native.pack_int8(_pad_rows(q, native.padded(out_f))), scales, in_f, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) bf16 -> (..., out) bf16, any number of rows."""
        buf = self._buffers
        return _forward(self, x, lambda x2: native.int8_mm(x2, buf["codes"], buf["scales"]))

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as float32 (int8 codes times the bf16 row scales)."""
        nb, groups = self.codes.shape[:2]
        q = self.codes.view(nb, groups, 16, native.BLOCK_N, 2).permute(0, 3, 1, 2, 4).reshape(nb * 16, -1)
        return q[: self.out_features].float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", kernel=amx"
