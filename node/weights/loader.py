"""Build a `Stage` from a checkpoint: on the meta device first, then only the shard's own tensors.

The stage is constructed with empty (meta) parameters; each linear layer, the embedding and the head are then
replaced by a module made straight from its `WeightSource` in the node's format (`f32`, `bf16`, `int8`,
`int4`), so a node never reads the tensors of other stages and a low-bit shard never exists in fp32.
The embedding and head of an `int4` stage are `int8` (`lowbit.formats.end_quant` says why); `shard_metadata` records
the format of every kind of module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from edgeshard.node.lowbit.factory import make_embedding, make_head, make_linear
from edgeshard.node.lowbit.formats import QUANT_FORMATS, compute_dtype, default_quant, end_quant
from edgeshard.node.lowbit.layers import module_weight_bytes, weight_format
from edgeshard.node.model.blocks import RMSNorm, SparseMoE
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.decoder import Stage, family_module, native_decode_supported
from edgeshard.node.weights.checkpoint import CheckpointError, GGUFCheckpoint, HFCheckpoint, StackedWeight

log = logging.getLogger("edgeshard.node")


def checkpoint_quant(ckpt: GGUFCheckpoint | HFCheckpoint) -> str:
    """The format a checkpoint runs in without --quant (lowbit/formats.py `default_quant` of its weights).

    Safetensors: by its stored dtype. GGUF: by the tensor type that holds most of layer 0's linear weights,
    so a mix like Q4_K_M (Q4_K, with Q6_K on attn_v and ffn_down) runs as int4 and an all-Q6_K file as int8.
    """
    if isinstance(ckpt, HFCheckpoint):
        return default_quant(None, ckpt.stored_dtype)
    weights: dict = {}
    for name in ckpt.names():
        if name.startswith("model.layers.0.") and name.endswith("proj.weight"):
            w = ckpt.weight(name)
            weights[w.ggml_type] = weights.get(w.ggml_type, 0) + math.prod(w.shape)
    if not weights:
        raise CheckpointError(f"{ckpt.path}: no projection weights in layer 0 to choose a default format by")
    return default_quant(max(weights, key=weights.get))


def load_stage(
    ckpt: GGUFCheckpoint | HFCheckpoint,
    spec: ShardSpec,
    quant: str | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> Stage:
    """Make the stage for `spec` holding only its own tensors, in format `quant` (default: the checkpoint's).

    `on_tensor(name, bytes)` is called after each tensor is materialized (progress bars, load reporting).
    """
    quant = quant or checkpoint_quant(ckpt)
    if quant not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_FORMATS)}")
    config = ckpt.config
    dtype = compute_dtype(quant)
    with torch.device("meta"):
        stage = Stage(config, spec, dtype=dtype)
    stage.init_tables()  # real rotary tables, not meta
    stage.quant = quant
    have = set(ckpt.names())
    family = family_module(config)
    if not native_decode_supported(config):
        log.info("architecture %s runs on the module path (the native decode path covers the Llama family)",
                 config.arch)  # fmt: skip

    def parts_of(name: str) -> list[str] | None:
        """The checkpoint tensors a stage tensor is made of: itself when the checkpoint has it (Phi-3's fused
        qkv_proj), else the rows the family's FUSED table stacks (or renames: Mixtral's w2 -> down_proj)."""
        if name in have:
            return [name]
        module, _, suffix = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf in family.FUSED:
            return [f"{parent}.{part}.{suffix}" for part in family.FUSED[leaf]]
        return None

    def source(name: str):
        names = parts_of(name)
        missing = [n for n in names or [name] if n not in have]
        if missing:
            raise CheckpointError(
                f"{ckpt.path}: tensor {missing[0]!r} is missing; the checkpoint is incomplete"
            )
        return (
            ckpt.weight(names[0]) if len(names) == 1 else StackedWeight(name, [ckpt.weight(n) for n in names])
        )

    def bias(name: str) -> torch.Tensor | None:
        names = parts_of(name)
        if not names or not all(n in have for n in names):
            return None
        return torch.cat([ckpt.weight(n).dense() for n in names])

    for mod_name, module in list(stage.named_modules()):
        key = "lm_head" if mod_name == "lm_head" else f"model.{mod_name}"
        parent_name, _, leaf = mod_name.rpartition(".")
        if isinstance(module, nn.Linear):
            if mod_name == "lm_head":
                src = source("lm_head.weight" if "lm_head.weight" in have else "model.embed_tokens.weight")
                new = make_head(src, end_quant(quant))
            elif leaf == "gate" and isinstance(getattr_path(stage, parent_name), SparseMoE):
                new = make_linear(source(f"{key}.weight"), None, "f32")  # the router stays float32
            else:
                new = make_linear(source(f"{key}.weight"), bias(f"{key}.bias"), quant)
            _replace(stage, mod_name, new)
        elif isinstance(module, nn.Embedding):
            _replace(
                stage,
                mod_name,
                make_embedding(source(f"{key}.weight"), end_quant(quant), out_dtype=torch.float32),
            )
        elif isinstance(module, RMSNorm):
            weight = source(f"{key}.weight").dense()
            if family.NORM_PLUS_ONE:  # Gemma scales by (1 + w); blocks.RMSNorm multiplies by its weight
                weight = 1.0 + weight
            module.weight = nn.Parameter(weight, requires_grad=False)
        else:
            continue
        if on_tensor is not None:
            on_tensor(mod_name, _module_bytes(getattr_path(stage, mod_name)))
    leftover = [n for n, p in list(stage.named_parameters()) + list(stage.named_buffers()) if p.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: no weights were loaded for {', '.join(leftover[:5])}")
    return stage.eval()


def stage_tensor_count(config, spec: ShardSpec) -> int:
    """How many times `load_stage` calls `on_tensor` for `spec` (its progress total), for any family: the
    stage's linear layers, embedding and norms (every expert of an MoE layer; Gemma's four norms a block)."""
    with torch.device("meta"):
        stage = Stage(config, spec)
    return sum(isinstance(m, (nn.Linear, nn.Embedding, RMSNorm)) for m in stage.modules())


def getattr_path(root: nn.Module, path: str) -> nn.Module:
    """`root.a.b.c` for path 'a.b.c'."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(getattr_path(root, parent) if parent else root, leaf, new)


def _module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def stage_weight_bytes(stage: nn.Module) -> int:
    """Bytes of weights a stage holds (parameters and buffers; rotary tables excluded)."""
    return _module_bytes(stage) - _module_bytes(stage.rotary)


def shard_metadata(stage: Stage) -> dict:
    """What a loaded stage holds, JSON-ready (for GetInfo and the planner): its layers, format and bytes.

    `modules` has one entry per kind of module and storage format: kind is "embedding", "linear" (the
    layers' projections), "norm" or "head"; format/bits/scale/group_size as `quant.weight_format` gives them;
    `count` modules holding `bytes` in all. For example an int4 SmolLM2 last stage:
        {"start_layer": 20, "end_layer": 30, "num_layers": 30, "quant": "int4", "compute_dtype": "bfloat16",
         "weight_bytes": ..., "modules": [
            {"kind": "linear", "format": "int4", "bits": 4, "scale": "group", "group_size": 32, "count": 40, ...},
            {"kind": "norm", "format": "f32", "bits": 32, "scale": "none", "group_size": 0, "count": 21, ...},
            {"kind": "head", "format": "int8", "bits": 8, "scale": "row", "group_size": 0, "count": 1, ...}]}
    """
    groups: dict[tuple, dict] = {}
    for name, module in stage.named_modules():
        if name == "embed_tokens":
            kind = "embedding"
        elif name == "lm_head":
            kind = "head"
        elif isinstance(module, RMSNorm):
            kind = "norm"
        elif name.endswith(".gate") and isinstance(stage.get_submodule(name.rpartition(".")[0]), SparseMoE):
            kind = "router"  # a mixture of experts' router, float32 in every format
        elif name.endswith("_proj"):
            kind = "linear"
        else:
            continue  # containers (blocks, attention, mlp) and the rotary tables hold no weights of their own
        fmt = weight_format(module)
        entry = groups.setdefault((kind, *fmt.values()), {"kind": kind, **fmt, "count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += module_weight_bytes(module)
    spec = stage.spec
    return {
        "start_layer": spec.start_layer,
        "end_layer": spec.end_layer,
        "num_layers": spec.num_layers,
        "quant": stage.quant,
        "compute_dtype": str(stage.dtype).removeprefix("torch."),
        "weight_bytes": stage_weight_bytes(stage),
        "modules": list(groups.values()),
        # low-bit kernels in use: "amx" (node/lowbit/amx.py), a dot-product set such as "avx2" or "neon-dot"
        # (node/lowbit/kernels.py), and/or "torch"; none for f32/bf16 stages
        "kernels": stage_kernels(stage),
    }


def stage_kernels(stage: nn.Module) -> list[str]:
    """The low-bit kernel sets a loaded stage's layers run on: "amx" (node/lowbit/amx.py), a dot-product set
    such as "avx2" or "neon-dot" (node/lowbit/kernels.py), and/or "torch"; [] for f32/bf16 stages."""
    return sorted({k for m in stage.modules() if (k := getattr(m, "kernel", None))})
