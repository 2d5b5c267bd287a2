"""Phi-3 / Phi-4-mini: the Llama block, with q/k/v and gate/up already fused in the checkpoint
(`self_attn.qkv_proj`, `mlp.gate_up_proj`: the loader reads a fused module's own tensor when the checkpoint
has it) and a sliding window on every layer when the config sets one. LongRoPE (the 128k models) is refused
by config.py."""

from __future__ import annotations

from edgeshard.node.model.llama import EMBED_SCALE, FUSED, NORM_PLUS_ONE, Block

__all__ = ["FUSED", "EMBED_SCALE", "NORM_PLUS_ONE", "Block"]
