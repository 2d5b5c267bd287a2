"""Checkpoint readers that open lazily and hand out only the tensors a stage asks for.

Two formats: a GGUF file (llama.cpp's format, read with the `gguf` package, memory-mapped) and a Hugging Face
directory (`config.json` + `*.safetensors`, sharded or not, read with `safe_open`). Both present tensors under
Hugging Face names (`model.layers.3.self_attn.q_proj.weight`) as `WeightSource`s that can give the raw
low-bit blocks (GGUF) or a dense fp32 tensor, so the quantizer can map GGUF blocks without expanding them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from edgeshard.node.errors import EdgeshardError
from edgeshard.node.lowbit.formats import WeightSource
from edgeshard.node.model.config import FULL, SLIDING, ModelConfig, UnsupportedModelError
from edgeshard.node.weights.gguf_file import GGUFFile, GGUFFormatError

# GGUF tensor types this reader dequantizes (others are refused with a clear error).
SUPPORTED_GGML_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# GGUF architectures read, and the HF model_type each maps to
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
}


class CheckpointError(EdgeshardError, ValueError):
    """A checkpoint file is missing, truncated, corrupt, or holds something this reader cannot use."""


class Checkpoint(Protocol):
    """A model file or directory: its config, tokenizer source, and lazily read tensors."""

    path: Path
    config: ModelConfig

    def names(self) -> list[str]: ...

    def weight(self, name: str) -> WeightSource: ...


# --------------------------------------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 names its four norms differently: llama.cpp's ffn_norm is the norm *before* the MLP there
_GGUF_LAYER_NAMES_BY_ARCH = {
    "gemma3": {
        **_GGUF_LAYER_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None for unknown tensors)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        part = _GGUF_LAYER_NAMES_BY_ARCH.get(arch, _GGUF_LAYER_NAMES).get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved -> half-split rotary layout)."""
    half = rows // n_heads // 2
    idx = np.arange(rows).reshape(n_heads, half, 2)  # GGUF row r = (head, i, pair)
    return idx.transpose(0, 2, 1).reshape(rows)  # HF row (head, pair, i) comes from GGUF row (head, i, pair)


@dataclass
class GGUFWeight:
    """A tensor of a GGUF file, HF layout; rows re-ordered on read when llama.cpp permuted them."""

    name: str
    shape: tuple[int, ...]
    ggml_type: Any
    _tensor: Any
    _rows: np.ndarray | None = None  # HF row i is GGUF row _rows[i]
    _offset: float = 0.0  # added on read: -1 for Gemma's norms, which llama.cpp stores as 1 + w

    def raw(self) -> np.ndarray:
        data = np.asarray(self._tensor.data)
        if data.ndim == 1:
            data = data.reshape(1, -1)
        data = data.reshape(data.shape[0], -1).view(np.uint8) if data.dtype != np.uint8 else data
        return data[self._rows] if self._rows is not None else data

    def dense(self) -> torch.Tensor:
        from gguf import GGMLQuantizationType, quants

        t = self._tensor
        if t.tensor_type == GGMLQuantizationType.F32:
            arr = np.asarray(t.data, dtype=np.float32)
        elif t.tensor_type == GGMLQuantizationType.F16:
            arr = np.asarray(t.data).astype(np.float32)
        else:
            arr = quants.dequantize(np.asarray(t.data), t.tensor_type)
        arr = arr.reshape(self.shape)
        if self._rows is not None:
            arr = arr[self._rows]
        out = torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: the file is mapped read-only
        return out + self._offset if self._offset else out


class GGUFCheckpoint:
    """A GGUF file: config from its metadata, tensors mapped to HF names, read lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self.reader = GGUFFile(self.path)
        except (GGUFFormatError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or "
                "corrupt: download it again (for the demo model: edgeshard models pull smollm2-135m)"
            ) from e
        self._check_extent()
        self.metadata = {
            k: _field_value(f) for k, f in self.reader.fields.items() if not k.startswith("tokenizer.ggml.")
        }
        self.config = self._config()
        self._tensors: dict[str, Any] = {}
        for t in self.reader.tensors:
            hf = gguf_to_hf_name(t.name, self.metadata["general.architecture"])
            if (
                hf is None
            ):  # e.g. llama.cpp's rope_freqs (Llama 3.1 scaling) or expert tensors: refuse, not drop
                raise UnsupportedModelError(
                    f"{self.path}: GGUF tensor {t.name!r} is not read by edgeshard; the model would compute "
                    "something else without it"
                )
            self._tensors[hf] = t

    def _check_extent(self) -> None:
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} ends at byte {end} but the file has {size} bytes: the file is "
                    "truncated; download it again"
                )

    def _meta(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.metadata.get('general.architecture')}.{key}", default)

    def _config(self) -> ModelConfig:
        """The ModelConfig of the file's metadata: every `{arch}.*` key is read, checked or refused."""
        arch = self.metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {arch!r} is not supported ({', '.join(GGUF_ARCHITECTURES)})"
            )
        meta = {k.removeprefix(f"{arch}."): v for k, v in self.metadata.items() if k.startswith(f"{arch}.")}
        for key, value in meta.items():
            if key not in _GGUF_KEYS:
                raise UnsupportedModelError(
                    f"{self.path}: GGUF key {arch}.{key} = {value!r} is not supported: edgeshard does not read "
                    "it, and it may change what the model computes"
                )
            if key in _GGUF_FIXED and value != _GGUF_FIXED[key]:
                raise UnsupportedModelError(
                    f"{self.path}: GGUF key {arch}.{key} = {value!r} is not supported"
                )
        names = {t.name for t in self.reader.tensors}
        heads = int(meta["attention.head_count"])
        hidden = int(meta["embedding_length"])
        n_layers = int(meta["block_count"])
        head_dim = int(meta.get("attention.key_length", hidden // heads))
        for key in ("attention.value_length", "rope.dimension_count"):
            if key in meta and int(meta[key]) != head_dim:
                raise UnsupportedModelError(
                    f"{self.path}: GGUF key {arch}.{key} = {meta[key]} differs from the head size {head_dim}; "
                    "only full-width rotary heads with equal key and value sizes are supported"
                )
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = meta.get("vocab_size") or (len(tokens.contents()) if tokens is not None else None)
        eos = self._tok_id("eos_token_id")
        bos = self._tok_id("bos_token_id")
        scaling = None
        kind = meta.get("rope.scaling.type", "none")
        if kind == "linear" and float(meta.get("rope.scaling.factor", 1.0)) != 1.0:
            scaling = {"rope_type": "linear", "factor": float(meta["rope.scaling.factor"])}
        elif kind not in ("none", "linear"):
            raise UnsupportedModelError(
                f"{self.path}: GGUF key {arch}.rope.scaling.type = {kind!r} is not supported"
            )
        kw: dict[str, Any] = {}
        if arch == "gemma3":
            # llama.cpp's Gemma 3: five sliding layers then one global one, sliding layers at RoPE base 10000
            # without scaling, softmax scale 1/sqrt(head_dim) except the 27B model (62 layers): sqrt(D/H)
            pattern = meta.get("attention.sliding_window_pattern")
            if isinstance(pattern, list):
                types = [SLIDING if on else FULL for on in pattern]
            else:
                types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
            kw.update(
                hidden_act="gelu_pytorch_tanh", qk_norm=True, layer_types=tuple(types),
                sliding_window=int(meta["attention.sliding_window"]),
                rope_local_theta=float(meta.get("rope.freq_base_swa", 10000.0)),
                query_pre_attn_scalar=float(hidden // heads if n_layers == 62 else head_dim),
                final_logit_softcapping=meta.get("final_logit_softcapping"),
            )  # fmt: skip
        elif "attention.sliding_window" in meta:
            raise UnsupportedModelError(
                f"{self.path}: GGUF key {arch}.attention.sliding_window is not supported for {arch}"
            )
        if arch == "qwen3":
            kw["qk_norm"] = True
        return ModelConfig(
            arch=GGUF_ARCHITECTURES[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(meta.get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            intermediate_size=int(meta["feed_forward_length"]),
            rope_theta=float(meta.get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(meta.get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=bos,
            eos_token_id=() if eos is None else (int(eos),),
            **kw,
        )

    def _tok_id(self, key: str) -> int | None:
        field = self.reader.fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else int(_field_value(field))

    def names(self) -> list[str]:
        """HF names of every tensor in the file."""
        return list(self._tensors)

    def weight(self, name: str) -> GGUFWeight:
        """The tensor `name` (HF naming), not yet read."""
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this GGUF file")
        if t.tensor_type.name not in SUPPORTED_GGML_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {t.name} has type {t.tensor_type.name}; supported: {', '.join(SUPPORTED_GGML_TYPES)}"
            )
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists (in, out); HF wants (out, in)
        rows = None
        c = self.config
        if c.arch in ("llama", "mistral") and re.search(r"self_attn\.[qk]_proj\.(weight|bias)$", name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            rows = _unpermute_rows(heads, shape[0])
        offset = -1.0 if c.arch == "gemma3" and name.endswith("norm.weight") else 0.0
        return GGUFWeight(name, shape, t.tensor_type, t, rows, offset)


# `{arch}.*` GGUF keys the reader implements (config above); any other is refused
_GGUF_KEYS = frozenset(
    """context_length embedding_length block_count feed_forward_length vocab_size attention.head_count
    attention.head_count_kv attention.key_length attention.value_length attention.layer_norm_rms_epsilon
    rope.freq_base rope.freq_base_swa rope.dimension_count rope.scaling.type rope.scaling.factor
    rope.scaling.original_context_length rope.scaling.finetuned attention.sliding_window
    attention.sliding_window_pattern final_logit_softcapping attn_logit_softcapping""".split()
)
_GGUF_FIXED = {"attn_logit_softcapping": None}  # present only with values the reader refuses


def _field_value(field: Any) -> Any:
    return field.contents()


@dataclass
class StackedWeight:
    """Several weights with the same input width stacked by rows (fused projections), read on demand."""

    name: str
    parts: list[Any]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    @property
    def ggml_type(self) -> Any:
        # one low-bit type for all parts keeps the blocks exact; mixed types (llama.cpp's _M mixes) go dense
        types = {p.ggml_type for p in self.parts}
        return types.pop() if len(types) == 1 else None

    def raw(self) -> np.ndarray:
        return np.concatenate([p.raw() for p in self.parts])

    def dense(self) -> torch.Tensor:
        return torch.cat([p.dense() for p in self.parts])


# ------------------------------------------------------------------------------------ safetensors


@dataclass
class SafetensorsWeight:
    """A tensor of a safetensors shard, read on `dense()`."""

    name: str
    shape: tuple[int, ...]
    file: Path
    ggml_type: Any = None

    def raw(self) -> np.ndarray:
        raise CheckpointError(f"{self.file}: {self.name} is a dense tensor; it has no low-bit blocks")

    def read(self) -> torch.Tensor:
        """The tensor in its stored dtype."""
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_tensor(self.name)

    def dense(self) -> torch.Tensor:
        return self.read().float()


class HFCheckpoint:
    """A Hugging Face model directory: config.json and safetensors (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(
                f"{self.path}: no config.json; a model directory needs config.json and *.safetensors"
            )
        try:
            self.hf_config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
        self.config = ModelConfig.from_hf(self.hf_config)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({self.path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.path}: no *.safetensors files (only safetensors checkpoints are read)"
            )
        self._weights: dict[str, SafetensorsWeight] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        shape = tuple(f.get_slice(name).get_shape())
                        self._weights[name] = SafetensorsWeight(name, shape, file)
            except Exception as e:  # safetensors raises SafetensorError for truncated headers/data
                raise CheckpointError(
                    f"{file}: cannot read safetensors ({e}); the file may be truncated"
                ) from e
        self.stored_dtype = _dtype_of(self.hf_config.get("torch_dtype", "float32"))

    def names(self) -> list[str]:
        """Tensor names in the checkpoint."""
        return list(self._weights)

    def weight(self, name: str) -> SafetensorsWeight:
        """The tensor `name`, not yet read."""
        try:
            return self._weights[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the safetensors files") from None


def _dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        name, torch.float32
    )


def open_checkpoint(path: str | os.PathLike) -> GGUFCheckpoint | HFCheckpoint:
    """Open a `.gguf` file or a Hugging Face directory (tensors stay on disk until asked for)."""
    p = Path(path)
    if p.is_dir():
        return HFCheckpoint(p)
    if p.suffix == ".gguf" or (p.is_file() and p.read_bytes()[:4] == b"GGUF"):
        return GGUFCheckpoint(p)
    if not p.exists():
        raise CheckpointError(
            f"{p}: no such file or directory (give a .gguf file or a Hugging Face model directory)"
        )
    raise CheckpointError(f"{p}: not a GGUF file or a model directory")


def stage_tensor_names(config: ModelConfig, start: int, end: int) -> Iterator[str]:
    """Checkpoint names a stage over layers [start, end) needs (embedding/head at the ends)."""
    if start == 0:
        yield "model.embed_tokens.weight"
    for i in range(start, end):
        for part in _GGUF_LAYER_NAMES.values():
            yield f"model.layers.{i}.{part}.weight"
    if end == config.num_hidden_layers:
        yield "model.norm.weight"
        yield "lm_head.weight"
