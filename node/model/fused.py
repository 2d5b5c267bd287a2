"""Decode rows through a whole stage in one native call (node/lowbit/csrc/decode.c), when the stage allows it.

`Stage.forward` splits a packed batch: rows of length-1 segments (decode steps) go through
`FusedDecode.run`, every other segment (prefill chunks) through the torch modules. A decoder layer is ~60
torch ops at a few microseconds of dispatch each, more than the layer's matmuls take at batch 1 on a small
model; decode.c runs the whole layer stack without returning to Python. Decode rows take this path whatever
else is in the batch, so a sequence's results never depend on what it is batched with.

Used when the stage computes in bf16 and every projection is a native layer of one kernel set: AMX
(node/lowbit/amx.py, decode.c) or the dot-product kernels of other CPUs (node/lowbit/kernels.py, dot.c's
es_decode_stage: the same call and struct). f32 and bf16 stages, and torch's kernels, keep the module path.
"""

from __future__ import annotations

import ctypes

import torch

from edgeshard.node.lowbit import native
from edgeshard.node.model.kv_cache import KVCache


class _Linear(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),
        ("codes", ctypes.c_void_p),
        ("params", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Linear),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
    ]


def _linear(module) -> _Linear | None:
    """The C view of an AMX or dot-product layer, or None for any other kind of layer."""
    from edgeshard.node.lowbit.amx import AmxInt4Linear, AmxInt8Linear
    from edgeshard.node.lowbit.kernels import DotInt4Linear, DotInt8Linear

    kinds = {
        AmxInt4Linear: (4, "params"),
        AmxInt8Linear: (8, "scales"),
        DotInt4Linear: (4, "params"),
        DotInt8Linear: (8, "scales"),
    }  # int4: fp16 params; int8: row scales
    if type(module) not in kinds:
        return None
    kind, params = kinds[type(module)]
    bias = module._buffers.get("bias")
    return _Linear(
        kind, module.codes.data_ptr(), module._buffers[params].data_ptr(),
        None if bias is None else bias.data_ptr(), module.out_features, module.in_features,
    )  # fmt: skip


def _shapes_supported(cfg) -> bool:
    """The limits node/lowbit/csrc/decode.c checks (es_decode_stage returns -1 outside them)."""
    group, hd = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    return (
        cfg.num_attention_heads % cfg.num_key_value_heads == 0 and group <= 16 and hd % 32 == 0 and hd <= 256
        and cfg.hidden_size % 32 == 0 and cfg.intermediate_size % 32 == 0
    )  # fmt: skip


class FusedDecode:
    """The C description of a stage's layers (pointers into its weights) and the call that runs them."""

    def __init__(self, stage, layers: ctypes.Array, keep: list[torch.Tensor], kernel: str = "amx") -> None:
        self.stage, self.layers, self._keep = stage, layers, keep  # _keep: tensors the pointers point into
        self.kernel, self._lib = kernel, native.variant_library(kernel)  # the kernel set of the layers

    @classmethod
    def build(cls, stage) -> FusedDecode | None:
        """For a loaded stage, or None when it cannot run fused (see the module docstring)."""
        if stage.dtype != torch.bfloat16 or not len(stage.layers):
            return None
        if not _shapes_supported(stage.config):
            return None
        layers, keep, kernels = [], [], set()
        for block in stage.layers.values():
            attn, mlp = block.self_attn, block.mlp
            modules = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            parts = [_linear(m) for m in modules]
            if any(p is None for p in parts):
                return None
            kernels.update(m.kernel for m in modules)
            norms = [block.input_layernorm.weight.detach().float().contiguous(),
                     block.post_attention_layernorm.weight.detach().float().contiguous()]  # fmt: skip
            keep += norms
            layers.append(_Layer(*parts, norms[0].data_ptr(), norms[1].data_ptr()))
        if len(kernels) != 1:  # one call runs one library: layers built under different kernel sets
            return None
        return cls(stage, (_Layer * len(layers))(*layers), keep, kernels.pop())

    def run(
        self,
        x: torch.Tensor,
        caches: list[KVCache],
        positions: list[int],
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> None:
        """Advance the residual rows x (S, D) float32 (contiguous, updated in place) through every layer, one
        row per sequence: row s is at positions[s] of caches[s]. cos/sin: (S, hd) bf16 rotary tables of those
        positions."""
        cfg, s = self.stage.config, x.shape[0]
        buffers = [c.reserve(p) for c, p in zip(caches, positions)]  # (layers, 2, Hkv, cap, hd) each
        arr = ctypes.c_int64 * s
        rc = self._lib.es_decode_stage(
            self.layers, len(self.layers), s, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            arr(*[b.data_ptr() for b in buffers]), arr(*[b.shape[3] for b in buffers]), arr(*positions),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc:  # shapes were checked at build: only its scratch allocation can fail
            raise MemoryError(f"the native decode step could not allocate its scratch buffers for {s} rows")
