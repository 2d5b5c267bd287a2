"""The weight formats a node runs, as data: which exist, which a checkpoint gets by default, what feeds them.

One place for these facts: the loader, the planner's cost model, the wire and the CLI all read them here.
`default_quant` maps one GGUF tensor type (or a safetensors dtype) to a format; `checkpoint_quant` picks a
whole checkpoint's default from the type that holds most of its layer weights (a Q4_K_M file is mostly Q4_K,
with Q6_K on the most sensitive tensors: it runs as int4).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

QUANT_FORMATS = ("f32", "bf16", "int8", "int4")


def _qt(name: str) -> QT | None:
    """The GGML type called `name`, or None if this gguf version does not know it."""
    return getattr(QT, name, None)


# What a GGUF tensor runs as when the user gives no --quant. 5- and 6-bit types go to int8, not int4:
# mixes like Q4_K_M spend Q6_K exactly on the tensors most sensitive to rounding (attn_v, ffn_down, output);
# squeezing them to 4 bits would throw that choice away, while int8 costs only 1.2x (Q6_K) to 1.45x (Q5_K)
# their file size. Flip these entries to "int4" if memory matters more than fidelity.
_DEFAULT_QUANT: dict[QT, str] = {
    t: q
    for names, q in (
        (("F32", "F64"), "f32"),
        (("F16", "BF16"), "bf16"),
        (("Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"), "int8"),
        (("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS"), "int4"),
        (
            ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "Q1_0"),
            "int4",
        ),
    )
    for name in names
    if (t := _qt(name)) is not None
}


@runtime_checkable
class WeightSource(Protocol):
    """One 2-D weight as the loader hands it over (the loader's objects satisfy this structurally).

    `shape` is (out_features, in_features) in Hugging Face layout. `raw()` is the GGUF block bytes of each
    row, uint8 (out_features, bytes_per_row), rows already in HF order; `dense()` is the dequantized
    float32 (out_features, in_features) tensor. `ggml_type` is None for safetensors checkpoints (then
    `raw()` is not used).
    """

    name: str
    shape: tuple[int, int]
    ggml_type: QT | None

    def raw(self) -> np.ndarray: ...

    def dense(self) -> torch.Tensor: ...


def compute_dtype(quant: str) -> torch.dtype:
    """The activation dtype a stage must feed to modules built with `quant` (and gets back from them)."""
    _check_quant(quant)
    return torch.float32 if quant == "f32" else torch.bfloat16


def end_quant(quant: str) -> str:
    """The format of the token embedding and output head of a stage whose layers run in `quant`.

    int4 layers get int8 ends. The head is the most rounding-sensitive matrix of a model and, tied or not,
    a large one (SmolLM2-135M: 49152 x 576, 21% of the weights). Measured on SmolLM2 with its Q4_1 layers
    (perplexity of tests/data/perplexity.txt; relative L2 distance of the logits to the float32 model's on
    tests/test_quant_model.py's prompts): int8 ends +0.2% and 1.2-2.0%; a 4-bit head +6.9% and 5-9%; 4-bit
    head and embedding +7.5% and 6-19%. The file agrees: its head (tied to token_embd) is Q8_0, and
    llama.cpp's 4-bit mixes keep the output head at 6-8 bits. The price is bandwidth: the int8 head reads
    28 MB per token against 18 MB in int4 (~10% of an int4 SmolLM2 decode step). An int4 last stage still
    holds ~0.2x its fp32 bytes. Every other format runs the ends in its own format.
    """
    _check_quant(quant)
    return "int8" if quant == "int4" else quant


def default_quant(ggml_type: QT | None, stored_dtype: torch.dtype = torch.float32) -> str:
    """The format a weight runs as when the user gives no --quant.

    For GGUF tensors this follows the file's type (Q4_x/K-quants <= 4 bit -> int4, Q5/Q6/Q8 -> int8,
    F16/BF16 -> bf16, F32 -> f32; F16 -> bf16 keeps 8 of fp16's 11 significant bits, because CPU fp16
    matmuls are slow). For safetensors (`ggml_type` None) it follows `stored_dtype`:
    float32/float64 -> f32, bfloat16/float16 -> bf16.
    """
    if ggml_type is None:
        if stored_dtype in (torch.float32, torch.float64):
            return "f32"
        if stored_dtype in (torch.bfloat16, torch.float16):
            return "bf16"
        raise ValueError(
            f"no default format for stored dtype {stored_dtype}; pass quant= one of {QUANT_FORMATS}"
        )
    try:
        return _DEFAULT_QUANT[ggml_type]
    except KeyError:
        raise ValueError(
            f"no default format for GGML type {getattr(ggml_type, 'name', ggml_type)}; "
            f"pass quant= one of {QUANT_FORMATS}"
        ) from None


def _check_quant(quant: str) -> None:
    if quant not in QUANT_FORMATS:
        raise ValueError(f"unknown quant format {quant!r}; expected one of {QUANT_FORMATS}")
