"""Gemma 3 (text): sliding-window and global layers, four norms a block, GELU-tanh, scaled embeddings.

Differences from the Llama block, all from the checkpoint's config:
  * layers alternate: five sliding-window layers (`sliding_window` keys, RoPE base `rope_local_theta`, 10000)
    then one global layer (RoPE base `rope_theta`, 1e6), per `layer_types`;
  * RMSNorms scale by (1 + w): the loader stores 1 + w (NORM_PLUS_ONE); four per block: before and after
    attention, before and after the MLP (the "post" norms apply to the branch, before the residual add);
  * q/k RMSNorm per head before RoPE; softmax scale 1/sqrt(query_pre_attn_scalar);
  * token embeddings scaled by sqrt(hidden_size); optional final logit soft-capping (Stage).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeshard.node.model.blocks import FUSED, MLP, Attention, RMSNorm, Segment
from edgeshard.node.model.config import ModelConfig

__all__ = ["FUSED", "EMBED_SCALE", "NORM_PLUS_ONE", "Block"]

EMBED_SCALE = True
NORM_PLUS_ONE = True


class Block(nn.Module):
    """One Gemma 3 layer: x + post_attn(attn(pre_attn(x))), then h + post_ffw(mlp(pre_ffw(h)))."""

    def __init__(self, config: ModelConfig, index: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.index = index
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, dtype)
        self.self_attn = Attention(config, index, dtype)
        # the branch outputs are normed in float32 before they join the float32 residual
        self.post_attention_layernorm = RMSNorm(d, eps, torch.float32)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, dtype)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act)
        self.post_feedforward_layernorm = RMSNorm(d, eps, torch.float32)

    def forward(self, x: torch.Tensor, rope: dict, segments: list[Segment], local: int) -> torch.Tensor:
        """x: (N, D) float32 residual stream -> (N, D) float32."""
        m = self._modules  # see llama.Block.forward
        a = m["self_attn"].forward(m["input_layernorm"].forward(x), rope, segments, local)
        h = x + m["post_attention_layernorm"].forward(a)
        f = m["mlp"].forward(m["pre_feedforward_layernorm"].forward(h))
        return h + m["post_feedforward_layernorm"].forward(f)
