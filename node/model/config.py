"""Model and shard configuration: plain dataclasses that describe what a stage computes.

`ModelConfig` is read from a Hugging Face `config.json` (`from_hf`) or from GGUF metadata
(weights/checkpoint.py). Reading never guesses: every key is either implemented, known not to change what
inference computes (training-only settings, bookkeeping), or refused with `UnsupportedModelError` naming the
key and its value. A key the reader does not know is refused too: a runtime that silently computes something
other than what the checkpoint says is the worst failure it can have (transformers 5 moved the RoPE base
into `rope_parameters`; a reader that dropped unknown keys ran every Llama 3 checkpoint with base 10000).

`ShardSpec` names the contiguous layer range `[start_layer, end_layer)` a stage owns; layer indices stay
global so checkpoint tensor names still match.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from edgeshard.node.errors import EdgeshardError

# model_type -> the family (one file in node/model/ each) that runs it
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
_ALIASES = {"gemma3_text": "gemma3"}  # transformers' model_type of the text-only Gemma 3

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the gated MLP's activation (HF names)
ROPE_TYPES = ("default", "linear", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedModelError(EdgeshardError, ValueError):
    """The checkpoint describes a model this decoder cannot run (architecture, rope scaling, ...)."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder of one of the families in FAMILIES."""

    arch: str = "llama"  # one of SUPPORTED_ARCHITECTURES (the HF model_type)
    vocab_size: int = 32000  # rows of the token embedding and the output head
    hidden_size: int = 4096  # D, the width of the residual stream
    num_hidden_layers: int = 32  # total layers of the model (a stage holds a range of them)
    num_attention_heads: int = 32  # H, query heads
    num_key_value_heads: int = 32  # Hkv, key/value heads (GQA when < H)
    head_dim: int = 0  # hd, 0 means hidden_size // num_attention_heads
    intermediate_size: int = 11008  # F, the gated MLP's hidden width
    rope_theta: float = 10000.0  # RoPE base frequency (of the full-attention layers)
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm
    max_position_embeddings: int = 4096  # the context length the model was trained for
    tie_word_embeddings: bool = False  # output head shares the token embedding matrix
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    bos_token_id: int | None = 1  # token that starts a sequence (None when the model has none)
    eos_token_id: tuple[int, ...] = (2,)  # tokens that end a generation
    # {"rope_type": "linear"|"llama3", ...} of the full-attention layers; None: plain RoPE
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)
    hidden_act: str = "silu"  # the gated MLP's activation, one of ACTIVATIONS
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)
    sliding_window: int | None = None  # keys a sliding-attention layer sees (itself included)
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer; () means all FULL
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta
    rope_local_scaling: dict[str, Any] | None = field(default=None, compare=False)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) (Gemma); None: 1/sqrt(hd)
    final_logit_softcapping: float | None = None  # logits = c * tanh(logits / c) (Gemma)
    num_experts: int = 0  # mixture of experts: experts per MoE layer (0: dense MLP)
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    moe_intermediate_size: int = 0  # F of one expert (Qwen3-MoE; Mixtral's experts use intermediate_size)
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    decoder_sparse_step: int = 1  # Qwen3-MoE: layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here

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
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise UnsupportedModelError(
                f"layer_types lists {len(self.layer_types)} layers, the model has {self.num_hidden_layers}"
            )
        for kind in set(self.layer_types) - {FULL, SLIDING}:
            raise UnsupportedModelError(f"layer type {kind!r} is not supported ({FULL}, {SLIDING})")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise UnsupportedModelError("layer_types has sliding layers but sliding_window is not set")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act = {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
            )
        for key, scaling in (
            ("rope_scaling", self.rope_scaling),
            ("rope_local_scaling", self.rope_local_scaling),
        ):
            _check_rope(key, scaling, self.head_dim)
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok = {self.num_experts_per_tok} with {self.num_experts} experts"
            )

    # ---- derived ----------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """The node/model/ module that runs this architecture."""
        return FAMILIES[self.arch]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_type(self, layer: int) -> str:
        """FULL or SLIDING for a global layer index."""
        return self.layer_types[layer] if self.layer_types else FULL

    def window(self, layer: int) -> int | None:
        """Keys layer `layer` attends to (itself included), or None for full causal attention."""
        if self.layer_type(layer) != SLIDING or self.sliding_window >= self.max_position_embeddings:
            return None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has a routed mixture of experts instead of a dense MLP."""
        if not self.is_moe:
            return False
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def attention_scale(self) -> float:
        """The factor on q.k before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token adds per layer, at 2 bytes an element."""
        return 2 * self.num_key_value_heads * self.head_dim * 2

    def to_dict(self) -> dict[str, Any]:
        """A JSON/msgpack-friendly dict (round-trips through `ModelConfig(**d)`)."""
        d = dataclasses.asdict(self)
        for k in ("eos_token_id", "layer_types", "mlp_only_layers"):
            d[k] = list(d[k])
        return d

    # ---- reading config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict; every key is used, checked or refused (module doc)."""
        return _HFReader(cfg).config()


# Keys of config.json that do not change what inference computes: bookkeeping, and settings that act only in
# training (dropout, router noise and losses, initialization) or only in transformers (caching, outputs).
_INERT = frozenset(
    """architectures model_type dtype torch_dtype transformers_version _name_or_path use_cache initializer_range
    pad_token_id attention_dropout embd_pdrop resid_pdrop hidden_dropout output_attentions output_hidden_states
    return_dict id2label label2id problem_type tokenizer_class auto_map is_llama_config router_aux_loss_coef
    output_router_logits router_jitter_noise cache_implementation attn_implementation sep_token_id unk_token_id
    chunk_size_feed_forward is_encoder_decoder keys_to_ignore_at_inference max_length""".split()
)
# Keys whose only implemented value is the one given; any other value is refused.
_FIXED = {
    "pretraining_tp": 1,  # Llama 1/2 tensor-parallel emulation (splits matmuls; no value but 1 is exact)
    "mlp_bias": False,
    "rope_interleaved": False,  # SmolLM2 writes it: GPT-J style rotation is not implemented
    "use_bidirectional_attention": False,  # EmbeddingGemma
    "attn_logit_softcapping": None,  # Gemma 2
    "partial_rotary_factor": 1.0,
    "use_mrope": False,  # Qwen2-VL's multimodal RoPE
}
# Keys each family reads (besides the common ones below).
_COMMON = frozenset(
    """vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    rms_norm_eps max_position_embeddings tie_word_embeddings bos_token_id eos_token_id hidden_act rope_theta
    rope_scaling rope_parameters""".split()
)
_FAMILY_KEYS = {
    "llama": {"attention_bias"},
    "mistral": {"sliding_window"},
    "qwen2": {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "qwen3": {"attention_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "gemma3": {
        "attention_bias",
        "sliding_window",
        "layer_types",
        "sliding_window_pattern",
        "_sliding_window_pattern",
        "hidden_activation",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "rope_local_base_freq",
    },  # fmt: skip
    "phi3": {"sliding_window", "original_max_position_embeddings"},
    "mixtral": {"sliding_window", "num_local_experts", "num_experts_per_tok"},
    "qwen3_moe": {
        "attention_bias",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    },  # fmt: skip
}


def _refuse(key: str, value: Any, why: str = "") -> UnsupportedModelError:
    shown = json.dumps(value) if not isinstance(value, str) else repr(value)
    return UnsupportedModelError(f"config key {key} = {shown} is not supported{': ' + why if why else ''}")


def _check_rope(key: str, scaling: dict[str, Any] | None, head_dim: int) -> None:
    """Refuse a RoPE variant the rotary tables do not compute (decoder: blocks.rope_inv_freq)."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "llama3"):
        raise _refuse(f"{key}.rope_type", kind, f"implemented: {', '.join(ROPE_TYPES)}")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}[kind]  # fmt: skip
    for k in needed:
        if not isinstance(scaling.get(k), (int, float)):
            raise _refuse(f"{key}.{k}", scaling.get(k), f"rope_type {kind!r} needs a number")


class _HFReader:
    """One config.json, read key by key: every key it holds must be consumed, inert, or refused."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = dict(cfg)
        model_type = cfg.get("model_type", "llama")
        self.arch = _ALIASES.get(model_type, model_type)
        if self.arch not in FAMILIES:
            raise UnsupportedModelError(
                f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self.allowed = _COMMON | _FAMILY_KEYS[self.arch]

    def get(self, key: str, default: Any = None) -> Any:
        return self.cfg.get(key, default)

    def config(self) -> ModelConfig:
        c, arch = self.cfg, self.arch
        for key, value in c.items():
            if key in _INERT:
                continue
            if key in _FIXED:
                if value != _FIXED[key] and not (value is None and key == "partial_rotary_factor"):
                    raise _refuse(key, value, f"only {json.dumps(_FIXED[key])} is implemented")
                continue
            if key not in self.allowed:
                raise _refuse(
                    key, value, f"edgeshard's {arch} reader does not know this key, and an unknown key may "
                    "change what the model computes (remove it from config.json if it does not)",
                )  # fmt: skip
        heads = int(c.get("num_attention_heads", 32))
        kw: dict[str, Any] = dict(
            arch=arch,
            num_attention_heads=heads,
            num_key_value_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or 0),
            attention_bias=bool(c.get("attention_bias", arch == "qwen2")),
        )
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if k in c:
                kw[k] = int(c[k])
        for k in ("rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
            if k in c:
                kw[k] = c[k]
        act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
        kw["hidden_act"] = "gelu_pytorch_tanh" if act == "gelu_tanh" else act
        kw.update(self._rope())
        kw.update(self._attention_layers(int(c.get("num_hidden_layers", 32))))
        if arch == "gemma3":
            kw["qk_norm"] = True
            kw["query_pre_attn_scalar"] = c.get("query_pre_attn_scalar")
            kw["final_logit_softcapping"] = c.get("final_logit_softcapping")
            kw.setdefault("tie_word_embeddings", True)
        if arch in ("qwen3", "qwen3_moe"):
            kw["qk_norm"] = True
        if arch in ("mixtral", "qwen3_moe"):
            n = c.get("num_local_experts", c.get("num_experts"))
            if not n or not c.get("num_experts_per_tok"):
                raise _refuse("num_local_experts", n, "a mixture-of-experts config needs its expert counts")
            kw.update(num_experts=int(n), num_experts_per_tok=int(c["num_experts_per_tok"]))
        if arch == "qwen3_moe":
            kw.update(
                moe_intermediate_size=int(c["moe_intermediate_size"]),
                norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                decoder_sparse_step=int(c.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(c.get("mlp_only_layers") or ()),
            )
        return ModelConfig(**kw)

    def _rope(self) -> dict[str, Any]:
        """rope_theta / rope_scaling (the older keys) or rope_parameters (transformers 5), for full and
        sliding layers."""
        c = self.cfg
        params = c.get("rope_parameters")
        if params is None:  # the older layout: rope_theta, rope_scaling, Gemma 3's rope_local_base_freq
            default_theta = 1_000_000.0 if self.arch in ("gemma3", "mixtral") else 10000.0
            full = {"rope_theta": c.get("rope_theta", default_theta), **(c.get("rope_scaling") or {})}
            local = {"rope_theta": c.get("rope_local_base_freq", 10000.0)} if self.arch == "gemma3" else None
        else:
            if "rope_scaling" in c and c["rope_scaling"] not in (None, params):
                raise _refuse("rope_scaling", c["rope_scaling"], "it disagrees with rope_parameters")
            if FULL in params or SLIDING in params:  # one set per layer type (Gemma 3)
                full, local = params.get(FULL), params.get(SLIDING)
                if full is None:
                    raise _refuse("rope_parameters", params, f"no {FULL!r} entry")
            else:
                full, local = params, None
            if "rope_theta" in c and c["rope_theta"] != full.get("rope_theta"):
                raise _refuse("rope_theta", c["rope_theta"], "it disagrees with rope_parameters")
        out = {}
        for prefix, p in (("rope", full), ("rope_local", local)):
            if p is None:
                continue
            theta, scaling = _split_rope(f"{prefix}_parameters", p)
            out["rope_theta" if prefix == "rope" else "rope_local_theta"] = theta
            out["rope_scaling" if prefix == "rope" else "rope_local_scaling"] = scaling
        return out

    def _attention_layers(self, n_layers: int) -> dict[str, Any]:
        """layer_types and sliding_window: which layers see only the last `sliding_window` keys."""
        c, arch = self.cfg, self.arch
        window = c.get("sliding_window")
        types = c.get("layer_types")
        if types is None:
            if arch == "gemma3":
                pattern = int(c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6)))
                types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
            elif arch in ("qwen2", "qwen3", "qwen3_moe"):
                first = int(c.get("max_window_layers", n_layers))
                on = bool(c.get("use_sliding_window", False)) and window
                types = [SLIDING if on and i >= first else FULL for i in range(n_layers)]
            else:  # Mistral, Phi-3, Mixtral: every layer slides when sliding_window is set
                types = [SLIDING if window else FULL] * n_layers
        elif arch in ("qwen2", "qwen3", "qwen3_moe") and not c.get("use_sliding_window", False):
            types = [FULL] * n_layers  # transformers ignores sliding_window without use_sliding_window
        types = tuple(types)
        return {
            "layer_types": types if SLIDING in types else (),
            "sliding_window": window if SLIDING in types else None,
        }


def _split_rope(key: str, p: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling or None) of one rope_parameters dict; unknown entries are refused."""
    kind = p.get("rope_type", p.get("type", "default"))
    theta = p.get("rope_theta")
    if not isinstance(theta, (int, float)):
        raise _refuse(f"{key}.rope_theta", theta, "the RoPE base must be a number")
    rest = {k: v for k, v in p.items() if k not in ("rope_theta", "rope_type", "type")}
    if rest.get("partial_rotary_factor", 1.0) not in (1.0, None):
        raise _refuse(
            f"{key}.partial_rotary_factor", rest["partial_rotary_factor"], "only 1.0 is implemented"
        )
    rest.pop("partial_rotary_factor", None)
    if kind == "default":
        if rest:
            k = next(iter(rest))
            raise _refuse(f"{key}.{k}", rest[k], "rope_type 'default' takes no other parameters")
        return float(theta), None
    if kind not in ROPE_TYPES:
        raise _refuse(f"{key}.rope_type", kind, f"implemented: {', '.join(ROPE_TYPES)}")
    allowed = {
        "linear": {"factor"},
        "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    }
    for k in rest:  # fmt: skip
        if k not in allowed[kind]:
            raise _refuse(f"{key}.{k}", rest[k], f"not a parameter of rope_type {kind!r} that is implemented")
    return float(theta), {"rope_type": kind, **rest}


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
