"""Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2 (RMSNorm, RoPE, grouped-query attention, SwiGLU).

The block every other family varies: pre-norm attention and pre-norm MLP, each added to a float32 residual.
Qwen2 adds q/k/v biases, Mistral a sliding window (both options of `blocks.Attention`).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeshard.node.model.blocks import FUSED, MLP, Attention, RMSNorm, Segment
from edgeshard.node.model.config import ModelConfig

__all__ = ["FUSED", "EMBED_SCALE", "NORM_PLUS_ONE", "Block"]

EMBED_SCALE = False  # token embeddings enter the residual as they are (Gemma scales them by sqrt(D))
NORM_PLUS_ONE = False  # the checkpoint's norm weights are the scale itself (Gemma stores scale - 1)


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm feed-forward, each with a residual.

    The residual stream `x` is float32 whatever the compute dtype (as in llama.cpp): the norms hand the
    layers `dtype` inputs and the layers' outputs are added back in float32. A bf16 residual rounds the large
    activations of early positions (SmolLM2: logit norms 2-3x the others') to a coarse grid at every layer.
    Measured on tests/test_quant_model.py's prompts, float32 residuals bring the int4 logits from 3.8% to
    1.9% (relative L2) of the float32 model's and the bf16 ones from 2.3% to 1.5%, at no cost: the norms
    cast and the residual adds ran anyway.
    """

    ffn_name = "mlp"  # the checkpoint's name of the feed-forward module (Mixtral: block_sparse_moe)

    def __init__(self, config: ModelConfig, index: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.index = index  # global layer index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, index, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        setattr(self, self.ffn_name, self.feed_forward(config, index))

    def feed_forward(self, config: ModelConfig, index: int) -> nn.Module:
        """The layer's feed-forward module (families with experts override this)."""
        return MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, rope: dict, segments: list[Segment], local: int) -> torch.Tensor:
        """x: (N, D) float32 residual stream -> (N, D) float32."""
        # submodules read from _modules and run by .forward: nn.Module's __getattr__ and __call__ cost ~1 us
        # each, ~20 us a layer at batch 1 where the layer's other work is ~250 us (no hooks are used here)
        m = self._modules
        h = x + m["self_attn"].forward(m["input_layernorm"].forward(x), rope, segments, local)
        return h + m[self.ffn_name].forward(m["post_attention_layernorm"].forward(h))
