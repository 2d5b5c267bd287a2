"""Low-bit linear layers and embeddings that a node builds straight from checkpoint weights.

A stage holds its weights in one of four formats (`QUANT_FORMATS`, lowbit/formats.py; lowbit/factory.py
builds the module for each):

    f32   nn.Linear, float32 weights and activations              4 bytes/weight
    bf16  nn.Linear, bfloat16 weights and activations             2 bytes/weight
    int8  Int8Linear, int8 weights + one scale per output row     ~1 byte/weight, bf16 activations
    int4  Int4Linear, 4-bit weights + bf16 scale/zero per 32      ~0.625 byte/weight, bf16 activations

Each module's `forward` is a single call into a low-bit aten kernel (`torch._weight_int4pack_mm_for_cpu`,
`torch._weight_int8pack_mm`) or `F.linear`; activations are bf16 for every format but f32 (see
`compute_dtype`), so a stage casts its input once, not per layer.

Where a GGUF type maps exactly onto a kernel's format the weights are converted by bit manipulation on the
raw blocks, without ever materialising a float32 copy of the tensor:

    Q4_0 -> int4   value = d*(q-8)              scale = d, zero = 0             exact (bf16 scale)
    Q4_1 -> int4   value = d*q + m              scale = d, zero = m + 8d        exact (bf16 scale/zero)
    Q4_K -> int4   value = d*sc_j*q - dmin*m_j  (per 32-weight sub-block j)     exact (bf16 scale/zero)

"Exact" means the 4-bit codes are the file's codes; only the per-group scale and zero are rounded to bf16
(the kernel's dtype, relative error <= 2^-8): each weight moves by <= (8*scale + |zero|) * 2^-8, i.e.
bf16 precision (measured: 0.25% relative RMS on SmolLM2's Q4_1 tensors, no perplexity change).
Everything else is dequantized row-chunk by row-chunk and re-quantized (int4: asymmetric min/max per group
of 32 like Q4_1; int8: symmetric per output row), which adds a second rounding on top of the file's own.
Q8_0 used as a *linear* layer is re-quantized to per-row int8 because `_weight_int8pack_mm` has one scale
per output row (tests/test_quant.py bounds that loss); as an *embedding* it is kept bit-exact (per-group
scales cost nothing when only the gathered rows are dequantized).

Many rows (prefill, batched decode) take another route. The low-bit kernels do their dequantization inside
the inner loop, once per row block of the input, so their cost grows linearly with rows (576->1536 at 512
rows: int4pack ~14 ms, a bf16 matmul of the same shape ~1 ms). From `dense_min_rows` rows on, `forward`
dequantizes the weight to bf16 once per call, in row chunks of ~4M weights so the transient stays small
(the layer never keeps a second, full-precision copy), and runs one bf16 matmul per chunk. Int4 codes are
read straight out of the kernel's packed layout; that layout is CPU-specific, so it is probed once at start
(`_int4pack_layout`), and a CPU whose layout is not recognised keeps the kernel for every row count.

Packed int4 weights are in the layout of the CPU they were packed on (64-row blocks on AVX-512, 32 on
AVX2, 16 on NEON): pack on the node that runs them, never ship or cache packed tensors across machines.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import gguf
import gguf.quants
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from edgeshard.node.lowbit.formats import QUANT_FORMATS, WeightSource, _qt

# GGUF types whose 4-bit codes are copied as-is into the int4 kernel's format.
_INT4_EXACT = {QT.Q4_0, QT.Q4_1, QT.Q4_K}
GROUP_SIZE = 32  # weights per int4 scale/zero group; matches GGUF's 32-weight blocks and sub-blocks
_INT8_QMAX = 127  # symmetric int8: -127..127 keeps the grid symmetric around 0
# rows are converted in chunks of ~1M weights (4 MB of float32) to bound peak memory: dequantizing a chunk
# makes several temporaries of its size (4M-weight chunks put ~75 MB more on a node's peak, bigmodel.py)
_CHUNK_ELEMS = 1 << 20
_ROW_ALIGN = 64  # chunk boundaries on multiples of the largest int4pack row block, so chunks pack identically
_INT4_N_ALIGN = 16  # _weight_int4pack_mm_for_cpu needs out_features % 16 == 0; we pad rows with zeros


def _own_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers held directly by `module` (not its children)."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers under `module`, counting shared tensors once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        nbytes = t.numel() * t.element_size()
        key = (t.data_ptr(), nbytes)
        if nbytes and key not in seen:
            seen.add(key)
            total += nbytes
    return total


def weight_format(module: nn.Module) -> dict[str, str | int]:
    """How a module stores its weight: {"format", "bits", "scale", "group_size"}, JSON-ready.

    format: one of QUANT_FORMATS; scale: "group" (one scale, and for int4 a zero, per `group_size` weights
    of a row), "row" (one scale per output row) or "none" (weights stored as they are, group_size 0).
    Works on this module's layers and embeddings and on any module with a float `weight` (norms).
    """
    if isinstance(module, (Int4Linear, Int4Embedding)):
        return {"format": "int4", "bits": 4, "scale": "group", "group_size": module.group_size}
    if isinstance(module, Int8Embedding):
        return {"format": "int8", "bits": 8, "scale": "group", "group_size": module.group_size}
    if isinstance(module, Int8Linear):
        return {"format": "int8", "bits": 8, "scale": "row", "group_size": 0}
    dtype = module.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{type(module).__name__} holds {dtype} weights, which are none of {QUANT_FORMATS}")
    fmt = "f32" if dtype == torch.float32 else "bf16"
    return {"format": fmt, "bits": torch.finfo(dtype).bits, "scale": "none", "group_size": 0}


def _bad_input(module: nn.Module, x: torch.Tensor, in_features: int, dtype: torch.dtype) -> ValueError:
    return ValueError(
        f"{type(module).__name__}: expected input (..., {in_features}) of dtype {dtype}, got shape "
        f"{tuple(x.shape)} dtype {x.dtype}; cast activations with .to(compute_dtype(quant)) once per stage"
    )


def _bias_buffer(bias: torch.Tensor | None, out_features: int, dtype: torch.dtype) -> torch.Tensor | None:
    if bias is None:
        return None
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    return bias.detach().to(dtype).contiguous()


class _FixedFormat(nn.Module):
    """Base of the low-bit modules: their buffers keep their dtypes under `.to(dtype)`/`.half()`/`.float()`.

    The kernels need exact dtypes (bf16 scales, uint8/int8 codes, fp16/fp32 embedding scales), so a
    stage-wide `stage.to(torch.bfloat16)` must not re-round or break them; device moves still apply.
    These modules hold buffers only (no parameters, no children).
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _FixedFormat:
        for name, buf in self._buffers.items():
            if buf is not None:
                out = fn(buf)
                self._buffers[name] = out if out.dtype == buf.dtype else buf.to(out.device)
        return self


# ---------------------------------------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------------------------------------


class Int4Linear(_FixedFormat):
    """y = x @ W.T (+ bias) with W in 4 bits, group-wise asymmetric (group 32), via int4pack on the CPU.

    Dequantized weight: W[n, k] = (q[n, k] - 8) * scale[k // 32, n] + zero[k // 32, n], q in 0..15.
    Holds `weight_packed` (uint8, (out_padded, in/2), CPU-specific layout) and `scales_and_zeros` (bf16,
    (in/32, out_padded, 2)). Input and output are bf16 (the kernel's only fast dtype on x86).
    """

    bits = 4
    kernel = "torch"  # which low-bit kernels run it (shard metadata); node/lowbit/amx.py's layers say "amx"
    # From this many input rows on, forward dequantizes and runs a bf16 matmul (module docstring). Crossover
    # of `python benchmarks/kernels.py --crossover` on SmolLM2's shapes, 1 thread (AVX-512): 48-96 rows.
    dense_min_rows = 64

    def __init__(
        self,
        weight_packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
        group_size: int = GROUP_SIZE,
    ) -> None:
        super().__init__()
        out_padded = weight_packed.shape[0]
        if weight_packed.dtype != torch.uint8 or tuple(weight_packed.shape) != (out_padded, in_features // 2):
            raise ValueError(
                f"weight_packed must be uint8 (out, {in_features // 2}), got {weight_packed.shape}"
            )
        if tuple(scales_and_zeros.shape) != (in_features // group_size, out_padded, 2):
            raise ValueError(
                f"scales_and_zeros must be ({in_features // group_size}, {out_padded}, 2), "
                f"got {tuple(scales_and_zeros.shape)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self._padded = out_padded != out_features  # rows added for the kernel's 16-row granularity
        layout = _int4pack_layout()
        # reading codes out of the packed layout needs whole row blocks; otherwise the kernel does all rows
        self._layout = layout if layout is not None and out_padded % layout[0] == 0 else None
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", _bias_buffer(bias, out_features, torch.bfloat16))

    @property
    def weight_bytes(self) -> int:
        """Bytes this layer holds (packed codes, scales/zeros, bias)."""
        return _own_bytes(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) bf16 -> (..., out) bf16."""
        # self._buffers[...] rather than self.<buffer>: nn.Module.__getattr__ costs ~1 us per buffer, and a
        # SmolLM2-sized layer runs in ~25 us at batch 1, so per-call Python overhead is kept to a minimum.
        buf = self._buffers
        if x.dtype != torch.bfloat16 or x.shape[-1] != self.in_features:
            raise _bad_input(self, x, self.in_features, torch.bfloat16)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        # many rows (prefill): dequantize once and run a bf16 matmul, see the module docstring
        if x2.shape[0] >= self.dense_min_rows and self._layout is not None:
            y = _chunked_matmul(x2, buf["weight_packed"].shape[0], self._dequantized_chunk)
        else:  # the kernel wants a contiguous (M, in) bf16 A; y is (M, out_padded) bf16
            y = torch._weight_int4pack_mm_for_cpu(
                x2.contiguous(), buf["weight_packed"], self.group_size, buf["scales_and_zeros"]
            )
        if self._padded:
            y = y[:, : self.out_features]
        if (bias := buf["bias"]) is not None:
            y = y + bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _dequantized_chunk(self, r0: int, r1: int) -> torch.Tensor:
        """W[r0:r1].T as bf16 (in, r1 - r0), read out of the packed codes (r0, r1 on row-block boundaries)."""
        block, stack_dim = self._layout
        return _unpack_int4pack(
            self.weight_packed[r0:r1], self.scales_and_zeros[:, r0:r1], block, stack_dim, self.group_size
        )

    @classmethod
    def from_codes(
        cls,
        rows: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
    ) -> Int4Linear:
        """Pack row chunks of (q uint8 (r, in) in 0..15, scale f32 (r, in/32), min f32 (r, in/32)),
        meaning W = q * scale + min, into the kernel's format. Chunks must start on multiples of 64 rows.
        """
        out_padded = -(-out_features // _INT4_N_ALIGN) * _INT4_N_ALIGN

        def packed_chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            ragged = False
            for q, scale, minv in rows:
                if ragged:  # the pack op lays rows out in blocks of up to 64: a partial block must come last
                    raise ValueError(
                        f"only the last row chunk may have a row count not divisible by {_ROW_ALIGN}"
                    )
                r = q.shape[0]
                ragged = r % _ROW_ALIGN != 0
                pad = -r % _INT4_N_ALIGN
                q32 = q.to(torch.int32)
                if pad:
                    # padding rows: q = 8, scale = zero = 0 -> weight 0; sliced off in forward
                    q32 = torch.cat([q32, torch.full((pad, in_features), 8, dtype=torch.int32)])
                    scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
                    minv = torch.cat([minv, minv.new_zeros(pad, minv.shape[1])])
                # the kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale (fp32, rounded once)
                sz = torch.stack([scale, minv + 8.0 * scale], dim=-1).to(torch.bfloat16)  # (r, in/32, 2)
                yield torch._convert_weight_to_int4pack_for_cpu(q32, 1), sz  # (r, in/2) uint8

        packed, sz = _collect(packed_chunks(), out_padded, "int4 codes")
        sz = sz.transpose(0, 1).contiguous()  # (in/32, out_padded, 2), the kernel's layout
        return cls(packed, sz, in_features, out_features, bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int4Linear:
        """Quantize a float (out, in) weight group-wise (asymmetric min/max per 32, like Q4_1)."""
        out_f, in_f = weight.shape
        _check_int4_in(in_f, "weight")
        chunks = (_quantize_int4(c.float(), bf16_params=True) for c in _chunks_of(weight.detach(), in_f))
        return cls.from_codes(chunks, in_f, out_f, bias)

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as the kernel sees it, read back through the kernel (bf16-rounded, as float32).

        For tests and debugging: multiplies an identity matrix, so it costs an (in x in) matmul.
        """
        cols = []
        for k0 in range(0, self.in_features, 1024):
            k1 = min(k0 + 1024, self.in_features)
            eye = torch.zeros(k1 - k0, self.in_features, dtype=torch.bfloat16)
            eye[:, k0:k1] = torch.eye(k1 - k0, dtype=torch.bfloat16)
            cols.append(
                torch._weight_int4pack_mm_for_cpu(
                    eye, self.weight_packed, self.group_size, self.scales_and_zeros
                )
            )  # (chunk of in, out_padded) = W[:, k0:k1].T
        return torch.cat(cols)[:, : self.out_features].T.float().contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class Int8Linear(_FixedFormat):
    """y = x @ W.T (+ bias) with W in int8, one bf16 scale per output row, via `torch._weight_int8pack_mm`.

    Kernel choice (benchmarks/kernels.py, 1 thread; figures in benchmarks/results/kernels.json): fbgemm
    dynamic int8 (`quantized.linear_dynamic`) is faster on x86 (576->1536: 0.028 vs 0.059 ms at batch 1,
    0.077 vs 0.276 ms at batch 8), but it is not used because
    (1) it quantizes the *activations* to 8 bits per tensor on every call, and LLM activations have outlier
        channels: with all 210 linears of SmolLM2-135M on fbgemm the perplexity rose by +75.7%, while
        weight-only int8 here changed it by -0.2% (noise; top-1 agreement with fp32 96%);
    (2) it needs quantized tensor types (`quantize_per_channel`), which torch 2.13 deprecates for removal;
    (3) fbgemm is x86-only: ARM boards would get qnnpack, with different speed and numerics.
    `_weight_int8pack_mm` is a plain aten op, weight-only, on every CPU; bf16 in, bf16 out.
    """

    bits = 8
    kernel = "torch"
    # See Int4Linear.dense_min_rows; int8 converts to bf16 in one cheap pass, so it crosses over earlier
    # (16-32 rows measured).
    dense_min_rows = 24

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be int8 (out, in), got {weight.dtype} {tuple(weight.shape)}")
        if tuple(scales.shape) != (weight.shape[0],):
            raise ValueError(f"scales must be ({weight.shape[0]},), got {tuple(scales.shape)}")
        self.out_features, self.in_features = weight.shape
        self.group_size = self.in_features  # one scale per row
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", _bias_buffer(bias, self.out_features, torch.bfloat16))

    @property
    def weight_bytes(self) -> int:
        """Bytes this layer holds (int8 codes, scales, bias)."""
        return _own_bytes(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) bf16 -> (..., out) bf16."""
        if x.dtype != torch.bfloat16 or x.shape[-1] != self.in_features:
            raise _bad_input(self, x, self.in_features, torch.bfloat16)
        buf = self._buffers  # see Int4Linear.forward: direct dict access keeps per-call overhead down
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.shape[0] >= self.dense_min_rows:  # many rows (prefill): see Int4Linear.forward
            # int8 codes are exact in bf16; the per-row scale is applied to the (M, out) result
            y = _chunked_matmul(x2, self.out_features, lambda r0, r1: buf["weight"][r0:r1].T) * buf["scales"]
        else:
            y = torch._weight_int8pack_mm(x2.contiguous(), buf["weight"], buf["scales"])  # (M, out) bf16
        if (bias := buf["bias"]) is not None:
            y = y + bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantize a float (out, in) weight symmetrically per output row."""
        chunks = (_quantize_int8_rows(c.float()) for c in _chunks_of(weight.detach(), weight.shape[1]))
        return cls.from_rows(*_collect(chunks, weight.shape[0], "weight"), bias)

    @classmethod
    def from_rows(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """int8 codes (out, in) and their row scales (out,)."""
        return cls(q, scales, bias)

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as float32 (int8 codes times the bf16 row scales)."""
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=8, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def _chunked_matmul(
    x: torch.Tensor, out_features: int, weight_t: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """x (M, in) bf16 @ W.T -> (M, out) bf16, W.T taken chunk by chunk: weight_t(r0, r1) is W[r0:r1].T (in, r).

    Chunks of ~4M weights bound the bf16 transient (8 MB) also for a 128k-row head; a SmolLM2 layer is one
    chunk. `weight_t` may return int8 (converted here, exactly) or bf16.
    """
    step = _chunk_rows(x.shape[1])
    ys = [
        x @ weight_t(r0, min(r0 + step, out_features)).to(torch.bfloat16)
        for r0 in range(0, out_features, step)
    ]
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)


def _unpack_int4pack(
    packed: torch.Tensor, scales_and_zeros: torch.Tensor, block: int, stack_dim: int, group_size: int
) -> torch.Tensor:
    """Dequantize int4pack rows to W.T, bf16 (in, rows): (q - 8) * scale + zero, without the kernel.

    packed: uint8 (rows, in/2) in the CPU layout `_int4pack_layout` found: rows in blocks of `block`, each
    block stored k-major as (in, block/2) bytes; byte j holds rows (j, j + block/2) ("halves", stack_dim 2)
    or (2j, 2j+1) ("pairs", stack_dim 3) of its block in its low and high nibble.
    scales_and_zeros: bf16 (in/group, rows, 2).
    """
    rows, k = packed.shape[0], packed.shape[1] * 2
    groups = k // group_size
    p = packed.view(rows // block, k, block // 2).transpose(0, 1).contiguous()  # (in, nblocks, block/2)
    q = torch.stack([p & 0x0F, p >> 4], dim=stack_dim).view(groups, group_size, rows)  # codes, rows in order
    scale = scales_and_zeros[..., 0].contiguous().unsqueeze(1)  # (groups, 1, rows)
    # (q - 8) * scale + zero == q * scale + (zero - 8 * scale): one fused op over the weights, in bf16
    # (two bf16 roundings per weight, ~2^-8 relative: the activations are bf16 anyway)
    zero = (scales_and_zeros[..., 1] - 8 * scales_and_zeros[..., 0]).unsqueeze(1)
    return torch.addcmul(zero, q, scale).view(k, rows)  # uint8 q promotes to bf16


@functools.cache
def _int4pack_layout() -> tuple[int, int] | None:
    """(block, stack_dim) of `_convert_weight_to_int4pack_for_cpu` on this CPU, or None if not recognised.

    The pack op picks its layout from the CPU it runs on (64-row blocks on AVX-512, 32 on AVX2, pairs of rows
    elsewhere), so instead of hard-coding one we pack random codes and keep the candidate that reads them
    back exactly. A layout matching none of them leaves every int4 layer on the kernel (slower prefill,
    same results).
    """
    rows, k = 128, 64  # whole blocks for every candidate
    q = torch.randint(0, 16, (rows, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, k // 2):
        return None
    sz = torch.zeros(k // GROUP_SIZE, rows, 2, dtype=torch.bfloat16)
    sz[..., 0], sz[..., 1] = 1.0, 8.0  # scale 1, zero 8: the dequantized weight is the code itself
    for block in (64, 32, 16):
        for stack_dim in (2, 3):
            if torch.equal(
                _unpack_int4pack(packed, sz, block, stack_dim, GROUP_SIZE).T, q.to(torch.bfloat16)
            ):
                return block, stack_dim
    return None


# ---------------------------------------------------------------------------------------------------------
# Embeddings: gather the rows of the requested tokens, dequantize only those rows.
# ---------------------------------------------------------------------------------------------------------


class _RowGather(_FixedFormat):
    """Shared input checking and bookkeeping of the embedding tables."""

    num_embeddings: int
    embedding_dim: int
    out_dtype: torch.dtype

    @property
    def weight_bytes(self) -> int:
        """Bytes this table holds."""
        return _own_bytes(self)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{type(self).__name__}: token ids must be int64 or int32, got {ids.dtype}")

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
            f"out_dtype={self.out_dtype}"
        )


class Int8Embedding(_RowGather):
    """Token embedding stored as int8 codes with one scale per group of 32 (exactly GGUF Q8_0's layout).

    weight int8 (vocab, dim), scales (vocab, dim/32) float16 (Q8_0's own) or float32; row = codes * scale.
    """

    bits = 8

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.group_size = GROUP_SIZE
        if tuple(scales.shape) != (self.num_embeddings, self.embedding_dim // GROUP_SIZE):
            raise ValueError(f"scales must be (vocab, dim/{GROUP_SIZE}), got {tuple(scales.shape)}")
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (...) int -> (..., dim) in out_dtype."""
        self._check_ids(ids)
        q = self.weight[ids].float().unflatten(-1, (-1, self.group_size))  # (..., dim/32, 32)
        return (q * self.scales[ids].float().unsqueeze(-1)).flatten(-2).to(self.out_dtype)


class Int4Embedding(_RowGather):
    """Token embedding stored as 4-bit codes with a float32 scale and min per group of 32 (row = q*scale + min).

    codes uint8 (vocab, dim/2): byte j of a row holds element 2j in the low and 2j+1 in the high nibble.
    """

    bits = 4

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, out_dtype: torch.dtype):
        super().__init__()
        self.num_embeddings = codes.shape[0]
        self.embedding_dim = codes.shape[1] * 2
        self.group_size = GROUP_SIZE
        self.out_dtype = out_dtype
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("mins", mins.float().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (...) int -> (..., dim) in out_dtype."""
        self._check_ids(ids)
        b = self.codes[ids]  # (..., dim/2)
        q = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).float()  # (..., dim)
        q = q.unflatten(-1, (-1, self.group_size))  # (..., dim/32, 32)
        w = q * self.scales[ids].unsqueeze(-1) + self.mins[ids].unsqueeze(-1)
        return w.flatten(-2).to(self.out_dtype)


# ---------------------------------------------------------------------------------------------------------
# Conversion: raw GGUF blocks -> codes, and float -> codes
# ---------------------------------------------------------------------------------------------------------


def _check_source(src: WeightSource) -> tuple[int, int]:
    if len(src.shape) != 2:
        raise ValueError(f"{src.name}: expected a 2-D weight (out, in), got shape {tuple(src.shape)}")
    return int(src.shape[0]), int(src.shape[1])


def _check_int4_in(in_features: int, name: str) -> None:
    if in_features % GROUP_SIZE:
        raise ValueError(
            f"{name}: int4 needs in_features divisible by {GROUP_SIZE}, got {in_features}; use quant='int8' or 'bf16'"
        )


def _collect(chunks: Iterator[tuple[torch.Tensor, ...]], rows: int, what: str) -> tuple[torch.Tensor, ...]:
    """Write row chunks of several tensors into preallocated (rows, ...) tensors.

    Preallocating instead of torch.cat keeps the peak at one copy of the result plus one chunk, which
    matters on 1-4 GB boards for tensors like a 128k-row head.
    """
    outs: tuple[torch.Tensor, ...] | None = None
    r0 = 0
    for parts in chunks:
        if outs is None:
            outs = tuple(torch.empty((rows, *p.shape[1:]), dtype=p.dtype) for p in parts)
        n = parts[0].shape[0]
        for out, part in zip(outs, parts):
            out[r0 : r0 + n] = part
        r0 += n
    if outs is None or r0 != rows:
        raise ValueError(f"{what}: got {r0} rows from the source, expected {rows}")
    return outs


def _chunk_rows(in_features: int) -> int:
    return max(_ROW_ALIGN, (_CHUNK_ELEMS // max(in_features, 1)) // _ROW_ALIGN * _ROW_ALIGN)


def _chunks_of(weight: torch.Tensor, in_features: int) -> Iterator[torch.Tensor]:
    step = _chunk_rows(in_features)
    for r0 in range(0, weight.shape[0], step):
        yield weight[r0 : r0 + step]


def _raw_rows(src: WeightSource) -> np.ndarray:
    """src.raw() checked against the GGML block size: uint8 (out, bytes_per_row)."""
    out_f, in_f = _check_source(src)
    assert src.ggml_type is not None
    block, type_size = gguf.GGML_QUANT_SIZES[src.ggml_type]
    raw = np.asarray(src.raw())
    want = (out_f, in_f // block * type_size)
    if raw.dtype != np.uint8 or raw.shape != want or in_f % block:
        raise ValueError(
            f"{src.name}: raw() of a {src.ggml_type.name} ({out_f}, {in_f}) weight must be uint8 {want}, "
            f"got {raw.dtype} {raw.shape}"
        )
    return raw


def _dense_chunks(src: WeightSource) -> Iterator[torch.Tensor]:
    """The weight as float32 row chunks (rows, in); quantized GGUF rows are dequantized one chunk at a time."""
    out_f, in_f = _check_source(src)
    step = _chunk_rows(in_f)
    t = src.ggml_type
    if t is not None and t not in (QT.F32, QT.F16, QT.BF16, _qt("F64")):
        raw = _raw_rows(src)
        try:
            for r0 in range(0, out_f, step):
                yield torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw[r0 : r0 + step], t)))
            return
        except NotImplementedError:
            pass  # this gguf version cannot dequantize the type row-wise; the loader's dense() can
    dense = src.dense()
    if tuple(dense.shape) != (out_f, in_f):
        raise ValueError(f"{src.name}: dense() has shape {tuple(dense.shape)}, expected {(out_f, in_f)}")
    for chunk in _chunks_of(dense, in_f):  # chunk first: a bf16 dense() is widened one chunk at a time
        yield chunk.float()


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 stored in the last axis (2 bytes) -> float32 without that axis."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF 32-weight nibble layout: 16 bytes -> low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_codes(raw: np.ndarray, t: QT, in_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_0/Q4_1/Q4_K rows -> (q uint8 (r, in) 0..15, scale f32 (r, in/32), min f32 (r, in/32)).

    Every weight is exactly q * scale + min (the float32 products of the file's fp16 fields).
    """
    r = raw.shape[0]
    if t == QT.Q4_0:  # block: d f16 | 16 B nibbles; w = d * (q - 8)
        b = raw.reshape(r, -1, 18)
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:]).reshape(r, in_features), d, -8.0 * d
    if t == QT.Q4_1:  # block: d f16 | m f16 | 16 B nibbles; w = d * q + m
        b = raw.reshape(r, -1, 20)
        return _nibbles(b[..., 4:]).reshape(r, in_features), _f16(b[..., 0:2]), _f16(b[..., 2:4])
    if t == QT.Q4_K:
        # super-block of 256: d f16 | dmin f16 | 12 B of 6-bit (scale, min) for 8 sub-blocks | 128 B nibbles.
        # Sub-block j: w = d * sc_j * q - dmin * m_j, i.e. an affine 4-bit group of 32.
        b = raw.reshape(r, -1, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # (r, S)
        s = b[..., 4:16].astype(np.uint8)  # (r, S, 12)
        sc = np.empty(s.shape[:-1] + (8,), np.uint8)
        mn = np.empty_like(sc)
        sc[..., :4] = s[..., 0:4] & 63
        mn[..., :4] = s[..., 4:8] & 63
        sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
        mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
        qs = b[..., 16:].reshape(r, -1, 4, 32)  # 4 chunks of 64 weights: low nibbles first, then high
        q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(r, in_features)
        scale = (d[..., None] * sc).reshape(r, -1)  # (r, S*8) = (r, in/32)
        minv = (-dmin[..., None] * mn).reshape(r, -1)
        return q, scale, minv
    raise ValueError(f"no exact int4 mapping for {t.name}")


def _quantize_int4(w: torch.Tensor, bf16_params: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (r, in) -> (q uint8 (r, in) 0..15, scale f32 (r, in/32), min f32 (r, in/32)), w ~ q*scale+min.

    Asymmetric min/max per group of 32 (like Q4_1). With bf16_params the scale and the kernel's zero
    (min + 8*scale) are rounded to bf16 *before* choosing q, so the codes fit the parameters actually used.
    """
    g = w.unflatten(-1, (-1, GROUP_SIZE))  # (r, in/32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale reproduces it
    zero = lo + 8.0 * scale
    if bf16_params:
        scale = scale.to(torch.bfloat16).float()
        zero = zero.to(torch.bfloat16).float()
    q = torch.round((g - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8.0).clamp_(0, 15)
    return q.to(torch.uint8).flatten(-2), scale, zero - 8.0 * scale


def _quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (r, in) -> (q int8 (r, in), scale f32 (r,) exactly representable in bf16), w ~ q * scale."""
    amax = w.abs().amax(-1)
    # Round the scale *up* to bf16 (x(1 + 2^-8) then round-to-nearest) so the row maximum never clips.
    scale = (amax / _INT8_QMAX * (1.0 + 2.0**-8)).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-_INT8_QMAX, _INT8_QMAX)
    return q.to(torch.int8), scale


def _quantize_int8_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (r, in) -> (q int8 (r, in), scale f32 (r, in/32)), symmetric per group of 32 (like Q8_0)."""
    g = w.unflatten(-1, (-1, GROUP_SIZE))
    scale = g.abs().amax(-1) / _INT8_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(g / scale.unsqueeze(-1)).clamp_(-_INT8_QMAX, _INT8_QMAX)
    return q.to(torch.int8).flatten(-2), scale


def _int4_code_chunks(src: WeightSource, bf16_params: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    """(q, scale, min) row chunks of a weight: copied from Q4_0/Q4_1/Q4_K blocks, else re-quantized."""
    out_f, in_f = _check_source(src)
    _check_int4_in(in_f, src.name)
    if src.ggml_type in _INT4_EXACT:
        raw = _raw_rows(src)
        step = _chunk_rows(in_f)
        for r0 in range(0, out_f, step):
            q, scale, minv = _q4_codes(raw[r0 : r0 + step], src.ggml_type, in_f)
            yield torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(minv)
    else:
        for w in _dense_chunks(src):
            yield _quantize_int4(w, bf16_params)


def _int8_row_chunks(src: WeightSource) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(q int8, scale) per-row int8 chunks of a weight (always a re-quantization, see the module docstring)."""
    if src.ggml_type == QT.Q8_0:
        # Dequantize Q8_0 ourselves (d * q is exact in float32), one chunk at a time.
        out_f, in_f = _check_source(src)
        raw = _raw_rows(src)
        step = _chunk_rows(in_f)
        for r0 in range(0, out_f, step):
            b = raw[r0 : r0 + step].reshape(-1, in_f // 32, 34)
            w = _f16(b[..., 0:2])[..., None] * np.ascontiguousarray(b[..., 2:]).view(np.int8)
            yield _quantize_int8_rows(torch.from_numpy(w.reshape(-1, in_f)))
    else:
        for w in _dense_chunks(src):
            yield _quantize_int8_rows(w)
