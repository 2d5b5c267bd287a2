"""Mixtral: the Llama block with a routed mixture of experts (`block_sparse_moe`) instead of the MLP.

Each token goes through its top-k experts (softmax over all experts, top-k renormalized to sum to 1); a
node holds every expert of its layers and computes only the routed ones (blocks.SparseMoE). The checkpoint
names an expert's gate/up/down `w1`/`w3`/`w2`.
"""

from __future__ import annotations

from torch import nn

from edgeshard.node.model import llama
from edgeshard.node.model.blocks import SparseMoE
from edgeshard.node.model.config import ModelConfig
from edgeshard.node.model.llama import EMBED_SCALE, NORM_PLUS_ONE

__all__ = ["FUSED", "EMBED_SCALE", "NORM_PLUS_ONE", "Block"]

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}


class Block(llama.Block):
    ffn_name = "block_sparse_moe"

    def feed_forward(self, config: ModelConfig, index: int) -> nn.Module:
        return SparseMoE(
            config.hidden_size, config.intermediate_size, config.num_experts, config.num_experts_per_tok,
            normalize=True, act=config.hidden_act,
        )  # fmt: skip
