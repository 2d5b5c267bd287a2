"""Build a `Stage` from a checkpoint: on the meta device first, then only the shard's own tensors.

The stage is constructed with empty (meta) parameters; each linear layer, the embedding and the head are then
replaced by a module made straight from its `WeightSource` in the node's format (`f32`, `bf16`, `int8`,
`int4`), so a node never reads the tensors of other stages and a low-bit shard never exists in fp32.
The embedding and head of an `int4` stage are `int8` (`quant.end_quant` says why); `shard_metadata` records
the format of every kind of module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, GGUFCheckpoint, HFCheckpoint, StackedWeight
from .config import ShardSpec
from .model import Rotary, Stage
from .quant import end_quant, module_weight_bytes, weight_format

QUANT_FORMATS = ("f32", "bf16", "int8", "int4")
# Fused stage modules -> the checkpoint modules whose rows they stack, in order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_COMPUTE_DTYPE = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.bfloat16,
    "int4": torch.bfloat16,
}


def default_quant(ckpt: GGUFCheckpoint | HFCheckpoint) -> str:
    """The format a checkpoint runs in without --quant: a GGUF keeps its low-bit type, safetensors its dtype."""
    if isinstance(ckpt, HFCheckpoint):
        return "f32" if ckpt.stored_dtype == torch.float32 else "bf16"
    qtype = ckpt.weight("model.layers.0.mlp.down_proj.weight").ggml_type.name
    if qtype in ("F32",):
        return "f32"
    if qtype in ("F16", "BF16"):
        return "bf16"
    if qtype == "Q8_0":
        return "int8"
    return "int4"  # Q4_0, Q4_1 and the K-quants


def load_stage(
    ckpt: GGUFCheckpoint | HFCheckpoint,
    spec: ShardSpec,
    quant: str | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> Stage:
    """Make the stage for `spec` holding only its own tensors, in format `quant` (default: the checkpoint's).

    `on_tensor(name, bytes)` is called after each tensor is materialized (progress bars, load reporting).
    """
    quant = quant or default_quant(ckpt)
    if quant not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_FORMATS)}")
    config = ckpt.config
    dtype = _COMPUTE_DTYPE[quant]
    with torch.device("meta"):
        stage = Stage(config, spec, dtype=dtype)
    stage.rotary = Rotary(config)  # real tables, not meta
    stage.quant = quant
    have = set(ckpt.names())

    def source(name: str):
        for fused, parts in FUSED.items():  # a fused module reads the checkpoint tensors it stacks
            prefix, dot, suffix = name.partition(f".{fused}.")
            if dot:
                return StackedWeight(name, [source(f"{prefix}.{part}.{suffix}") for part in parts])
        if name not in have:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing; the checkpoint is incomplete")
        return ckpt.weight(name)

    def bias(name: str) -> torch.Tensor | None:
        for fused, parts in FUSED.items():
            prefix, dot, suffix = name.partition(f".{fused}.")
            if dot:
                names = [f"{prefix}.{part}.{suffix}" for part in parts]
                return (
                    torch.cat([source(n).dense() for n in names]) if all(n in have for n in names) else None
                )
        return source(name).dense() if name in have else None

    for mod_name, module in list(stage.named_modules()):
        key = "lm_head" if mod_name == "lm_head" else f"model.{mod_name}"
        if isinstance(module, nn.Linear):
            if mod_name == "lm_head":
                src = source("lm_head.weight" if "lm_head.weight" in have else "model.embed_tokens.weight")
                new = _make_head(src, end_quant(quant))
            else:
                new = _make_linear(source(f"{key}.weight"), bias(f"{key}.bias"), quant)
            _replace(stage, mod_name, new)
        elif isinstance(module, nn.Embedding):
            _replace(stage, mod_name, _make_embedding(source(f"{key}.weight"), end_quant(quant)))
        elif mod_name.endswith("layernorm") or mod_name == "norm":
            module.weight = nn.Parameter(source(f"{key}.weight").dense(), requires_grad=False)
        else:
            continue
        if on_tensor is not None:
            on_tensor(mod_name, _module_bytes(getattr_path(stage, mod_name)))
    leftover = [n for n, p in list(stage.named_parameters()) + list(stage.named_buffers()) if p.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: no weights were loaded for {', '.join(leftover[:5])}")
    return stage.eval()


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
        elif name == "norm" or name.endswith("layernorm"):
            kind = "norm"
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
        # low-bit kernels in use: "amx" (node/amx.py), a dot-product set such as "avx2" or "neon-dot"
        # (node/kernels.py), and/or "torch"; none for f32/bf16 stages
        "kernels": sorted({k for m in stage.modules() if (k := getattr(m, "kernel", None))}),
    }


def _dense_linear(src, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = src.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(src.dense().to(dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return lin


def _make_linear(src, bias: torch.Tensor | None, quant: str) -> nn.Module:
    if quant in ("f32", "bf16"):
        return _dense_linear(src, bias, _COMPUTE_DTYPE[quant])
    from . import quant as q

    return q.make_linear(src, bias, quant)


def _make_head(src, quant: str) -> nn.Module:
    if quant in ("f32", "bf16"):
        return _dense_linear(src, None, _COMPUTE_DTYPE[quant])
    from . import quant as q

    return q.make_head(src, quant)


def _make_embedding(src, quant: str) -> nn.Module:
    if quant in ("f32", "bf16"):
        emb = nn.Embedding(*src.shape, device="meta")
        emb.weight = nn.Parameter(src.dense().to(_COMPUTE_DTYPE[quant]), requires_grad=False)
        return emb
    from . import quant as q

    # rows come out in float32, the dtype of the residual stream (model.Block): Q8_0 rows are exact there
    return q.make_embedding(src, quant, out_dtype=torch.float32)
