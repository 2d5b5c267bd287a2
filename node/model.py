"""A Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) built for one stage: a contiguous layer range.

The stage takes a *packed* batch: the tokens of several sequences laid end to end, `N` rows in all, with a
`Segment` per sequence saying where its rows start in its own positions and which KV cache it writes.
Linear layers run once over all `N` rows (that is the batching); attention runs per segment against the
segment's cache. One decode step of one sequence is simply a batch of one segment of length 1.

Parameter names follow the Hugging Face checkpoint keys (without the leading `model.`), and layers keep
their global index (`layers.12.self_attn.o_proj.weight`), so a stage loads only its own tensors by name. Two
modules are fused for speed and named for what they stack: `self_attn.qkv_proj` (q_proj, k_proj, v_proj rows)
and `mlp.gate_up_proj` (gate_proj, up_proj rows); the loader knows the mapping (`loader.FUSED`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, ShardSpec
from .kv_cache import KVCache


@dataclass
class Segment:
    """The rows of one sequence inside a packed batch."""

    cache: KVCache  # this sequence's cache on this stage
    start: int  # position of the segment's first row in the sequence
    length: int  # rows (tokens) in the segment


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 as the reference implementation does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding tables (cos, sin), extended on demand; HF `rotate_half` convention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq = _inv_freq(config)  # (hd/2,)
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each position: (N, hd)."""
        need = int(positions.max()) + 1
        if self.cos.shape[0] < need or self.cos.dtype != dtype:
            n = max(need, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)  # (n, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
            self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return self.cos[positions], self.sin[positions]


def _inv_freq(config: ModelConfig) -> torch.Tensor:
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1 long-context scaling: low frequencies divided by `factor`, a smooth band in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv = torch.where(is_mid, mid, scaled)
    return inv


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, hd); cos/sin: (N, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Attention(nn.Module):
    """Grouped-query self-attention over a packed batch, one KV cache per segment."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        # q, k and v projections fused into one matmul (the checkpoint's q_proj/k_proj/v_proj rows, stacked):
        # at batch 1 a CPU decode step is dominated by per-call overhead, so three calls become one.
        self.qkv_split = [self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd]
        self.qkv_proj = nn.Linear(d, sum(self.qkv_split), bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment], layer: int
    ) -> torch.Tensor:
        N, _ = x.shape  # (N, D)
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        q = q.view(N, self.n_heads, self.head_dim)  # (N, H, hd)
        k = k.view(N, self.n_kv_heads, self.head_dim)  # (N, Hkv, hd)
        v = v.view(N, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        outs, row = [], 0
        for seg in segments:
            rows = slice(row, row + seg.length)
            row += seg.length
            keys, values = seg.cache.update_and_fetch(
                layer, seg.start, k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            )  # (Hkv, start+T, hd)
            qs = q[rows].transpose(0, 1).unsqueeze(0)  # (1, H, T, hd)
            # 4-D inputs: torch's CPU SDPA takes its fused kernel for (B, H, T, hd), ~8x faster in bf16
            out = F.scaled_dot_product_attention(
                qs, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=_causal_mask(seg), enable_gqa=True
            )  # (1, H, T, hd)
            outs.append(out[0].transpose(0, 1).reshape(seg.length, -1))  # (T, H*hd)
        y = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, H*hd)
        return self.o_proj(y)


def _causal_mask(seg: Segment) -> torch.Tensor | None:
    """Rows attend to keys at or before their own position; None when nothing needs masking."""
    if seg.length == 1:
        return None
    total = seg.start + seg.length
    q_pos = torch.arange(seg.start, total).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(total).unsqueeze(0)  # (1, start+T)
    return k_pos <= q_pos  # (T, start+T) bool


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=False)  # rows: gate_proj then up_proj
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (N, F) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each with a residual."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index  # global layer index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment], local: int
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, segments, local)
        return h + self.mlp(self.post_attention_layernorm(h))


class Stage(nn.Module):
    """The layers `[spec.start_layer, spec.end_layer)` of a model, plus embedding/head at the ends.

    forward(inputs, segments):
      first stage: inputs are token ids (N,); other stages: hidden states (N, D).
      last stage returns logits; others return hidden states (N, D) for the next stage.
    """

    def __init__(self, config: ModelConfig, spec: ShardSpec, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config, self.spec, self.dtype = config, spec, dtype
        if spec.num_layers != config.num_hidden_layers:
            raise ValueError(
                f"shard of a {spec.num_layers}-layer model, but the model has {config.num_hidden_layers}"
            )
        if spec.is_first:
            # _weight skips the random init (on the meta device that init alone imports torch._dynamo: seconds)
            V, D = config.vocab_size, config.hidden_size
            self.embed_tokens = nn.Embedding(V, D, _weight=torch.empty(V, D))
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in spec.layers})
        if spec.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for one sequence on this stage."""
        c = self.config
        return KVCache(
            len(self.layers),
            c.num_key_value_heads,
            c.head_dim,
            self.dtype,
            max_len or c.max_position_embeddings,
        )

    @torch.inference_mode()
    def forward(
        self, inputs: torch.Tensor, segments: list[Segment], all_logits: bool = False
    ) -> torch.Tensor:
        """Run the stage on a packed batch; the last stage returns logits of each segment's last row
        (S, V), or of every row (N, V) with all_logits."""
        if self.spec.is_first:
            x = self.embed_tokens(inputs).to(self.dtype)  # (N,) -> (N, D)
        else:
            x = inputs.to(self.dtype)  # (N, D)
        positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])  # (N,)
        cos, sin = self.rotary.tables(positions, self.dtype)  # (N, hd)
        for local, block in enumerate(self.layers.values()):
            x = block(x, cos, sin, segments, local)
        for seg in segments:
            seg.cache.advance(seg.start, seg.length)
        if not self.spec.is_last:
            return x
        if not all_logits:
            last_rows = torch.tensor([s.length for s in segments]).cumsum(0) - 1  # (S,)
            x = x[last_rows]
        return self.lm_head(self.norm(x)).float()  # (S or N, V)
