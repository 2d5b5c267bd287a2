"""Building a layer from a checkpoint weight: the one place that picks the module class for a format.

`make_linear`, `make_head` and `make_embedding` take a `WeightSource` and a format (lowbit/formats.py) and
return the module the stage holds: `nn.Linear`/`nn.Embedding` for f32/bf16, the low-bit layers of
lowbit/layers.py for int8/int4, or their native-kernel subclasses (lowbit/amx.py) where the CPU runs those.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from edgeshard.node.lowbit.formats import WeightSource, _check_quant, compute_dtype
from edgeshard.node.lowbit.layers import (
    GROUP_SIZE,
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    _check_source,
    _collect,
    _dense_chunks,
    _int4_code_chunks,
    _int8_row_chunks,
    _quantize_int8_groups,
    _raw_rows,
)


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An `nn.Linear` holding `weight` (out, in) and `bias` as they are (f32 or bf16), without grad."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        if tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
        lin.bias = nn.Parameter(bias.detach().to(weight.dtype).contiguous(), requires_grad=False)
    return lin


def make_linear(src: WeightSource, bias: torch.Tensor | None, quant: str) -> nn.Module:
    """Build the linear layer y = x @ W.T (+ bias) for weight `src` in format `quant` (one of QUANT_FORMATS).

    Q4_0/Q4_1/Q4_K -> int4 copies the file's 4-bit codes; other combinations dequantize row chunks and
    re-quantize (int4: asymmetric per 32; int8: symmetric per row). The module takes and returns
    activations of `compute_dtype(quant)`.
    """
    _check_quant(quant)
    out_f, in_f = _check_source(src)
    int4_cls, int8_cls = lowbit_classes(in_f)
    if quant == "int4":
        # the torch kernel takes bf16 scale/zero: quantize with those already rounded (ours keep fp16)
        chunks = _int4_code_chunks(src, bf16_params=int4_cls is Int4Linear)
        return int4_cls.from_codes(chunks, in_f, out_f, bias)
    if quant == "int8":
        if hasattr(int8_cls, "from_row_chunks"):  # packs chunk by chunk: the weight is never held twice
            return int8_cls.from_row_chunks(_int8_row_chunks(src), out_f, bias)
        return int8_cls.from_rows(*_collect(_int8_row_chunks(src), out_f, src.name), bias)
    dtype = compute_dtype(quant)
    (weight,) = _collect(((w.to(dtype),) for w in _dense_chunks(src)), out_f, src.name)
    return _dense_linear(weight, bias)


def _amx_kernels() -> bool:
    """Whether int4/int8 layers are built for the node's own kernels (lowbit/native.py: AMX, or the integer
    dot-product kernels of lowbit/csrc/dot.c) in this process; False means torch's kernels."""
    from edgeshard.node.lowbit import native

    return native.available()


def lowbit_classes(in_features: int) -> tuple[type[Int4Linear], type[Int8Linear]]:
    """The (int4, int8) linear classes this process builds for `in_features` inputs: lowbit/amx.py's where the
    AMX kernels run, lowbit/kernels.py's where the dot-product kernels run (both need in_features % 32 == 0),
    else the torch-kernel ones."""
    if _amx_kernels() and in_features % GROUP_SIZE == 0:
        from edgeshard.node.lowbit import native

        if native.amx():
            from edgeshard.node.lowbit.amx import AmxInt4Linear, AmxInt8Linear

            return AmxInt4Linear, AmxInt8Linear
        from edgeshard.node.lowbit.kernels import DotInt4Linear, DotInt8Linear

        return DotInt4Linear, DotInt8Linear
    return Int4Linear, Int8Linear


def make_head(src: WeightSource, quant: str) -> nn.Module:
    """Build the output head (vocab, hidden): logits = h @ W.T, in `compute_dtype(quant)`.

    The head is the largest matmul of a small model (49152 x 576 for SmolLM2-135M), so it gets the same
    low-bit kernels as the layers. For tied models pass the embedding's source: the head then holds its own
    copy (int8: per-row scales for the kernel; the embedding keeps Q8_0's per-group scales). Logits come
    back in bf16 for int8/int4/bf16: cast to float32 before softmax/sampling.
    """
    out_f, in_f = _check_source(src)
    if quant == "int4" and in_f % GROUP_SIZE:
        raise ValueError(
            f"{src.name}: int4 head needs hidden size divisible by {GROUP_SIZE}; use quant='int8'"
        )
    return make_linear(src, None, quant)


def make_embedding(src: WeightSource, quant: str, out_dtype: torch.dtype | None = None) -> nn.Module:
    """Build the token embedding (vocab, hidden) for `quant`, returning rows in `out_dtype` (default
    `compute_dtype(quant)`; the dense f32/bf16 tables are `nn.Embedding`s in their own dtype).

    int8 keeps int8 codes with a scale per 32 (bit-exact for Q8_0 files), int4 keeps 4-bit codes with a
    scale and min per 32 (bit-exact for Q4_0/Q4_1/Q4_K); only the gathered rows are dequantized.
    """
    _check_quant(quant)
    vocab, dim = _check_source(src)
    out_dtype = out_dtype or compute_dtype(quant)
    if quant in ("f32", "bf16"):
        (weight,) = _collect(((w.to(compute_dtype(quant)),) for w in _dense_chunks(src)), vocab, src.name)
        emb = nn.Embedding(vocab, dim, device="meta")
        emb.weight = nn.Parameter(weight, requires_grad=False)
        return emb
    if dim % GROUP_SIZE:
        raise ValueError(f"{src.name}: {quant} embedding needs dim divisible by {GROUP_SIZE}; use 'bf16'")
    if quant == "int8":
        if src.ggml_type == QT.Q8_0:
            b = _raw_rows(src).reshape(vocab, dim // 32, 34)
            scales = torch.from_numpy(np.ascontiguousarray(b[..., 0:2]).view("<f2")[..., 0].copy())
            codes = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(vocab, dim))
            return Int8Embedding(codes, scales, out_dtype)
        codes, scales = _collect((_quantize_int8_groups(w) for w in _dense_chunks(src)), vocab, src.name)
        return Int8Embedding(codes, scales, out_dtype)
    chunks = (
        (q[:, 0::2] | (q[:, 1::2] << 4), scale, minv)  # two codes per byte, element 2j in the low nibble
        for q, scale, minv in _int4_code_chunks(src, bf16_params=False)
    )
    return Int4Embedding(*_collect(chunks, vocab, src.name), out_dtype)
