"""Model and shard configuration: plain dataclasses that describe what a stage computes.

`ModelConfig` mirrors a Hugging Face `config.json` (unknown keys are dropped) and can also be read from the
metadata of a GGUF file. `ShardSpec` names the contiguous layer range `[start_layer, end_layer)` a stage owns;
layer indices stay global so checkpoint tensor names still match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgeshard.node.errors import EdgeshardError

# Architectures the decoder covers: all are "Llama-family" (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(EdgeshardError, ValueError):
    """The checkpoint describes a model this decoder cannot run (architecture, rope scaling, ...)."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder."""

    arch: str = "llama"  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int = 32000  # rows of the token embedding and the output head
    hidden_size: int = 4096  # D, the width of the residual stream
    num_hidden_layers: int = 32  # total layers of the model (a stage holds a range of them)
    num_attention_heads: int = 32  # H, query heads
    num_key_value_heads: int = 32  # Hkv, key/value heads (GQA when < H)
    head_dim: int = 0  # hd, 0 means hidden_size // num_attention_heads
    intermediate_size: int = 11008  # F, the SwiGLU hidden width
    rope_theta: float = 10000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm
    max_position_embeddings: int = 4096  # the context length the model was trained for
    tie_word_embeddings: bool = False  # output head shares the token embedding matrix
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    bos_token_id: int | None = 1  # token that starts a sequence (None when the model has none)
    eos_token_id: tuple[int, ...] = (2,)  # tokens that end a generation
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)  # only "llama3" supported

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"{self.num_attention_heads} query heads are not a multiple of {self.num_key_value_heads} kv heads"
            )
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is None:
            object.__setattr__(self, "eos_token_id", ())
        else:
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in (None, "default", "llama3"):
                raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (supported: llama3)")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict; unknown keys are dropped."""
        model_type = cfg.get("model_type", "llama")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        kwargs["arch"] = model_type
        if model_type == "qwen2":
            kwargs.setdefault("attention_bias", True)
        kwargs.setdefault("num_key_value_heads", cfg.get("num_attention_heads", 32))
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = 0
        return cls(**kwargs)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token adds per layer, at 2 bytes an element."""
        return 2 * self.num_key_value_heads * self.head_dim * 2

    def to_dict(self) -> dict[str, Any]:
        """A JSON/msgpack-friendly dict (round-trips through `ModelConfig(**d)`)."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d


@dataclass(frozen=True)
class ShardSpec:
    """The layer range `[start_layer, end_layer)` of a model that one stage runs."""

    start_layer: int  # first global layer index the stage runs
    end_layer: int  # one past the last global layer index
    num_layers: int  # total layers of the model, to know whether this is the first/last stage

    def __post_init__(self) -> None:
        if not (0 <= self.start_layer < self.end_layer <= self.num_layers):
            raise ValueError(
                f"layer range [{self.start_layer}, {self.end_layer}) is not inside a model of "
                f"{self.num_layers} layers; use 0 <= start < end <= {self.num_layers}"
            )

    @classmethod
    def full(cls, num_layers: int) -> ShardSpec:
        """The whole model in one stage."""
        return cls(0, num_layers, num_layers)

    @property
    def is_first(self) -> bool:
        """This stage owns the token embedding (takes token ids)."""
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        """This stage owns the final norm and the output head (returns logits)."""
        return self.end_layer == self.num_layers

    @property
    def layers(self) -> range:
        """Global indices of the layers this stage runs."""
        return range(self.start_layer, self.end_layer)

    def __str__(self) -> str:
        return f"layers {self.start_layer}-{self.end_layer - 1} of {self.num_layers}"


def even_split(num_layers: int, num_stages: int) -> list[ShardSpec]:
    """Contiguous ranges of near-equal size (the first stages get the remainder)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    specs, start = [], 0
    for i in range(num_stages):
        end = start + base + (1 if i < extra else 0)
        specs.append(ShardSpec(start, end, num_layers))
        start = end
    return specs
