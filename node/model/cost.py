"""What a model costs a node, per layer and per token, computed from its `ModelConfig` alone.

The planner decides where layers go before anything is loaded, so it needs the bytes each shard will hold
and the work each token does, without opening a checkpoint. The byte counts mirror the modules of
node/lowbit/layers.py exactly (tests/test_cost.py checks them against `stage_weight_bytes` of real shards):

    f32 / bf16  out*in * 4 / 2                              (DenseLinear, nn.Linear)
    int8        out*in + 2*out                              (int8 codes + one bf16 scale per output row)
    int4        out16*in/2 + (in/32)*out16*2*2              (packed nibbles + bf16 scale/zero per 32;
                                                             out16 = out rounded up to 16, the kernel's pad)

Embeddings keep per-group scales (int8: codes + a scale per 32; int4: nibbles + f32 scale and min per 32).
The embedding and head of an int4 shard are int8 (`END_QUANT`, mirroring node/lowbit/layers.py `end_quant`).
The KV cache is held in the stage's compute dtype (bf16, or f32 for f32 shards).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeshard.node.model.config import ModelConfig

QUANTS = ("f32", "bf16", "int8", "int4")
_GROUP = 32  # int4/int8 embedding and int4 linear group size (node/lowbit/layers.py GROUP_SIZE)
_INT4_ROW_PAD = 16  # int4pack needs out_features % 16 == 0; quant.py pads rows with zeros
# format of the embedding and head where it differs from the layers' (node/lowbit/layers.py end_quant)
END_QUANT = {"int4": "int8"}


def linear_bytes(
    out_features: int, in_features: int, quant: str, bias: bool = False, amx: bool = False
) -> int:
    """Bytes a linear layer (out, in) holds in format `quant`, as node/lowbit/layers.py builds it: torch's kernels'
    layout, or with `amx` node/lowbit/amx.py's (int8 rows padded to 16 as well). The planner prices remote nodes
    with the default: the layouts differ only for int8 layers whose out_features is not a multiple of 16."""
    out16 = -(-out_features // _INT4_ROW_PAD) * _INT4_ROW_PAD
    if quant == "f32":
        return 4 * out_features * (in_features + bias)
    if quant == "bf16":
        return 2 * out_features * (in_features + bias)
    if quant == "int8":
        return (out16 if amx else out_features) * in_features + 2 * out_features + 2 * out_features * bias
    if quant == "int4":  # codes + (scale, min) per group of 32: bf16 for torch's kernel, fp16 for AMX
        return out16 * in_features // 2 + (in_features // _GROUP) * out16 * 4 + 2 * out_features * bias
    raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")


def embedding_bytes(vocab: int, dim: int, quant: str) -> int:
    """Bytes of the token embedding table in format `quant` (int8: a float16 scale per 32, as Q8_0 stores it;
    int4: a float32 scale and min per 32)."""
    if quant in ("f32", "bf16"):
        return vocab * dim * (4 if quant == "f32" else 2)
    groups = vocab * (dim // _GROUP)
    if quant == "int8":
        return vocab * dim + 2 * groups
    if quant == "int4":
        return vocab * dim // 2 + 8 * groups  # nibbles + f32 scale + f32 min per group
    raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")


@dataclass(frozen=True)
class ModelCost:
    """Per-layer and per-token costs of one model in one weight format (a value: compare, print, hash)."""

    num_layers: int  # decoder layers of the model
    quant: str  # f32, bf16, int8, int4
    layer_bytes: int  # weights one decoder layer holds (7 linears + norms; every expert of an MoE layer)
    embed_bytes: int  # token embedding (first stage only)
    head_bytes: int  # final norm + output head (last stage only)
    kv_bytes_per_token: int  # K and V one token adds to ONE layer's cache, in the compute dtype
    layer_flops: int  # multiply-adds x 2 of one layer for one token (attention over the context excluded;
    # an MoE layer: the router and the top-k experts a token runs)
    activation_bytes: int  # hidden state of one token on the wire between stages
    hidden_size: int  # D
    vocab_size: int  # V (the head's rows; sampling works over V logits)

    @classmethod
    def of(cls, config: ModelConfig, quant: str) -> ModelCost:
        """The cost of `config` with every linear layer in format `quant`."""
        c = config
        d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
        q_out, kv_out = c.num_attention_heads * hd, c.num_key_value_heads * hd
        attn = [(q_out, d, c.attention_bias), (kv_out, d, c.attention_bias), (kv_out, d, c.attention_bias),
                (d, q_out, False)]  # q k v o  # fmt: skip
        dense = [(f, d, False), (f, d, False), (d, f, False)]  # gate up down
        norms = (4 if c.family == "gemma3" else 2) * d * 4 + (2 * hd * 4 if c.qk_norm else 0)  # f32 norms
        if c.is_moe:
            # a node holds every expert of its layers (and the float32 router); a token runs top-k of them.
            # The MoE layer is priced for every layer (Qwen3-MoE's dense mlp_only_layers cost less).
            fe = c.moe_intermediate_size or f
            expert = [(fe, d, False), (fe, d, False), (d, fe, False)]
            layer = sum(linear_bytes(o, i, quant, b) for o, i, b in attn) + norms + 4 * c.num_experts * d
            layer += c.num_experts * sum(linear_bytes(o, i, quant, b) for o, i, b in expert)
            flops = 2 * (sum(o * i for o, i, _ in attn) + c.num_experts * d
                         + c.num_experts_per_tok * sum(o * i for o, i, _ in expert))  # fmt: skip
        else:
            shapes = attn + dense
            layer = sum(linear_bytes(o, i, quant, b) for o, i, b in shapes) + norms
            flops = 2 * sum(o * i for o, i, _ in shapes)
        act_dtype_bytes = 4 if quant == "f32" else 2
        return cls(
            num_layers=c.num_hidden_layers,
            quant=quant,
            layer_bytes=layer,
            embed_bytes=embedding_bytes(c.vocab_size, d, END_QUANT.get(quant, quant)),
            head_bytes=linear_bytes(c.vocab_size, d, END_QUANT.get(quant, quant)) + d * 4,
            kv_bytes_per_token=2 * kv_out * act_dtype_bytes,
            layer_flops=flops,
            activation_bytes=d * act_dtype_bytes,
            hidden_size=d,
            vocab_size=c.vocab_size,
        )

    def weight_bytes(self, start: int, end: int) -> int:
        """Weights of the shard holding layers [start, end), with the embedding/head at the ends."""
        total = (end - start) * self.layer_bytes
        if start == 0:
            total += self.embed_bytes
        if end == self.num_layers:
            total += self.head_bytes
        return total

    def kv_bytes(self, layers: int, context: int, sessions: int = 1) -> int:
        """KV cache of `layers` layers for `sessions` sequences of `context` positions.

        The cache grows in steps of 256 positions (node/model/kv_cache.py), so the context is rounded up to that.
        """
        positions = -(-context // 256) * 256
        return layers * positions * sessions * self.kv_bytes_per_token

    @property
    def total_weight_bytes(self) -> int:
        """Weights of the whole model (every layer, embedding and head)."""
        return self.weight_bytes(0, self.num_layers)
