"""Qwen3-MoE (Qwen3-30B-A3B): the Qwen3 block (q/k norms) with a routed mixture of experts as `mlp` on the
layers `config.is_moe_layer` picks (decoder_sparse_step, mlp_only_layers), a dense MLP on the others.

Routing: softmax over all experts, top-k, renormalized only with `norm_topk_prob` (blocks.SparseMoE); each
expert is a gated MLP of width `moe_intermediate_size`. A node holds every expert of its layers.
"""

from __future__ import annotations

from torch import nn

from edgeshard.node.model import qwen3
from edgeshard.node.model.blocks import MLP, SparseMoE
from edgeshard.node.model.config import ModelConfig
from edgeshard.node.model.qwen3 import EMBED_SCALE, FUSED, NORM_PLUS_ONE

__all__ = ["FUSED", "EMBED_SCALE", "NORM_PLUS_ONE", "Block"]


class Block(qwen3.Block):
    def feed_forward(self, config: ModelConfig, index: int) -> nn.Module:
        if not config.is_moe_layer(index):
            return MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        return SparseMoE(
            config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok,
            normalize=config.norm_topk_prob, act=config.hidden_act,
        )  # fmt: skip
