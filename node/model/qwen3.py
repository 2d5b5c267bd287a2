"""Qwen3: the Llama block with an RMSNorm over each query and key head before RoPE (config.qk_norm), and
no q/k/v biases. The q/k norms are `self_attn.q_norm` / `self_attn.k_norm` in the checkpoint."""

from __future__ import annotations

from edgeshard.node.model.llama import EMBED_SCALE, FUSED, NORM_PLUS_ONE, Block

__all__ = ["FUSED", "EMBED_SCALE", "NORM_PLUS_ONE", "Block"]
