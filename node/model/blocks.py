"""The pieces every decoder family is built from: norms, rotary tables, attention, gated MLP, routed experts.

Each family (node/model/llama.py, qwen3.py, gemma3.py, phi3.py, mixtral.py, qwen3_moe.py) assembles a
`Block` from these, as mlx-lm does; `Stage` (node/model/decoder.py) stacks the blocks of a layer range.

Attention and MLP take a *packed* batch: the rows of several sequences laid end to end, `N` rows in all,
with a `Segment` per sequence saying where its rows start in its own positions and which KV cache it
writes. Linear layers run once over all `N` rows (that is the batching); attention runs per segment against
the segment's cache. One decode step of one sequence is a batch of one segment of length 1.

Module names follow the Hugging Face checkpoint keys, except two fused modules named for what they stack:
`self_attn.qkv_proj` (q_proj, k_proj, v_proj rows) and `gate_up_proj` (gate_proj, up_proj rows): at batch 1
a CPU decode step is dominated by per-call overhead, so three calls become one. A family's `FUSED` table
tells the loader which checkpoint tensors a fused module stacks (Phi-3 checkpoints hold them fused already).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeshard.node.model.config import FULL, SLIDING, ModelConfig
from edgeshard.node.model.kv_cache import KVCache

# fused module leaf -> the checkpoint leaves it stacks by rows, in order (the loader's default)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class Segment:
    """The rows of one sequence inside a packed batch."""

    cache: KVCache  # this sequence's cache on this stage
    start: int  # position of the segment's first row in the sequence
    length: int  # rows (tokens) in the segment


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 as the reference implementation does; returns `out_dtype`.

    Gemma's norms scale by (1 + w): the loader stores 1 + w in `weight` (checkpoint.py), so one kernel serves
    both (the product is computed from the same float32 (1 + w) transformers forms at run time).
    """

    def __init__(self, dim: int, eps: float, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.out_dtype = out_dtype  # the stage's compute dtype: what the linear layers after the norm take
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one call instead of five ops (pow, mean, rsqrt, two muls). A layer norm of [x, -x] is the same math
        # in one native kernel (~20% faster) but gives NaN where sum(x^2) overflows (|x| ~ 1e19 and up, as
        # a broken or hostile upstream may send), where this gives 0: the node must stay up on any finite input
        w = self._parameters["weight"]  # not self.weight: see LlamaBlock.forward
        return F.rms_norm(x.float(), w.shape, w, self.eps).to(self.out_dtype)


# ------------------------------------------------------------------------------------------------ rotary


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """The (hd/2,) inverse frequencies of RoPE with base `theta` and an optional scaling (config.ROPE_TYPES)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "linear":  # positions divided by `factor` (Gemma 3's global layers)
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1 long-context scaling: low frequencies divided by `factor`, a smooth band in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv = torch.where(is_mid, mid, scaled)
    elif kind is not None:  # config.py refuses these at reading; this guards hand-made configs
        raise ValueError(f"rope type {kind!r} is not implemented")
    return inv


class Rotary(nn.Module):
    """Rotary position embedding tables of one base, extended on demand; HF `rotate_half` convention.

    `sin` is stored with its first half negated, so that rotate_half(x) * sin == x.roll(hd/2) * signed_sin:
    one roll instead of two slices, a negation and a cat per call (bit-identical products).
    """

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.inv_freq = inv_freq  # (hd/2,)
        self.cos = torch.empty(0)
        self.signed_sin = torch.empty(0)

    def tables(self, segments: list[Segment], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for the rows of a packed batch: (N, 1, hd) each, broadcast over heads."""
        need = max(s.start + s.length for s in segments)
        if self.cos.shape[0] < need or self.cos.dtype != dtype:
            n = max(need, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)  # (n, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
            sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
            self.cos, self.signed_sin = emb.cos().to(dtype)[:, None], sin.to(dtype)[:, None]  # (n, 1, hd)
        if len(segments) == 1:  # the common case (one decode step, one prefill chunk): views, no gather
            rows = slice(segments[0].start, segments[0].start + segments[0].length)
            return self.cos[rows], self.signed_sin[rows]
        positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])  # (N,)
        return self.cos[positions], self.signed_sin[positions]


class Rotaries(nn.Module):
    """One `Rotary` per distinct RoPE of the model's layers: full-attention layers use `rope_theta` (and
    `rope_scaling`), sliding layers `rope_local_theta` when the config sets one (Gemma 3: 10000 vs 1e6)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hd = config.head_dim
        self.full = Rotary(rope_inv_freq(hd, config.rope_theta, config.rope_scaling))
        self.local = (
            self.full
            if config.rope_local_theta is None
            else Rotary(rope_inv_freq(hd, config.rope_local_theta, config.rope_local_scaling))
        )

    def tables(
        self, segments: list[Segment], dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer type: (cos, signed_sin)} for the rows of a packed batch."""
        full = self.full.tables(segments, dtype)
        return {FULL: full, SLIDING: full if self.local is self.full else self.local.tables(segments, dtype)}


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin. x: (N, heads, hd); cos/signed_sin: (N, 1, hd) from `Rotary.tables`.
    `out=x` rotates in place."""
    # roll by hd/2 swaps the halves: (x1, x2) -> (x2, x1); the sign of rotate_half lives in signed_sin
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin, out=out)


# --------------------------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Grouped-query self-attention over a packed batch, one KV cache per segment.

    Options by config: q/k/v biases, an RMSNorm over each query and key head before RoPE (`qk_norm`), the
    softmax scale (`query_pre_attn_scalar`), and a sliding window for the layer (`config.window(layer)`).
    """

    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = hd = config.head_dim
        self.scale = config.attention_scale
        self.window = config.window(layer)
        self.rope = config.layer_type(layer)  # which table of Rotaries.tables this layer uses
        d, bias = config.hidden_size, config.attention_bias
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, dtype)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, rope: dict, segments: list[Segment], layer: int) -> torch.Tensor:
        N, _ = x.shape  # (N, D)
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        mods = self._modules  # not self.qkv_proj etc.: see LlamaBlock.forward
        qkv = mods["qkv_proj"].forward(x).view(N, -1, hd)  # (N, H+2Hkv, hd): q, k, v heads
        qk = qkv[:, : H + Hkv]
        if self.qk_norm:  # per-head RMSNorm of q and k, written back in place before the rotation
            qk[:, :H] = mods["q_norm"].forward(qk[:, :H])
            qk[:, H:] = mods["k_norm"].forward(qk[:, H:])
        cos, sin = rope[self.rope]
        # q and k rotated together (one set of ops, not two) and in place: k and v then sit side by side in
        # qkv, which the cache writes with one copy
        apply_rotary(qk, cos, sin, out=qk)
        if N == 1:  # one decode step, the hot path: no loop, no cat
            return mods["o_proj"].forward(self._attend(qkv, segments[0], layer))
        outs, row = [], 0
        for seg in segments:
            outs.append(self._attend(qkv[row : row + seg.length], seg, layer))
            row += seg.length
        return mods["o_proj"].forward(torch.cat(outs) if len(outs) > 1 else outs[0])  # (N, H*hd)

    def _attend(self, qkv: torch.Tensor, seg: Segment, layer: int) -> torch.Tensor:
        """One segment's attention: qkv (T, H+2Hkv, hd) with q and k rotated -> (T, H*hd)."""
        T = qkv.shape[0]
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if T == 1:  # a decode step: with one row, these are views, no transposes
            q, kv = qkv[:, :H].view(1, H, 1, hd), qkv[:, H:].view(2, Hkv, 1, hd)
        else:
            q = qkv[:, :H].transpose(0, 1).unsqueeze(0)  # (1, H, T, hd)
            kv = qkv[:, H:].unflatten(1, (2, Hkv)).permute(1, 2, 0, 3)  # (2, Hkv, T, hd): keys, values
        kv = seg.cache.update_and_fetch_kv(layer, seg.start, kv)  # (2, Hkv, start+T, hd)
        mask = _causal_mask(seg, self.window)
        if T == 1 and self.window is not None:  # a decode row sees the last `window` keys: a view, no mask
            kv = kv[:, :, max(0, seg.start + 1 - self.window) :]
        # 4-D inputs: torch's CPU SDPA takes its fused kernel for (B, H, T, hd), ~8x faster in bf16
        out = F.scaled_dot_product_attention(
            q, kv[:1], kv[1:], attn_mask=mask, enable_gqa=True, scale=self.scale
        )  # (1, H, T, hd)
        # the kernel lays its output out as (1, T, H, hd): both are views, no copy
        return out.view(1, H * hd) if T == 1 else out[0].transpose(0, 1).reshape(T, H * hd)


def _causal_mask(seg: Segment, window: int | None = None) -> torch.Tensor | None:
    """Rows attend to keys at or before their own position (and, with a window, fewer than `window`
    positions back); None when nothing needs masking."""
    if seg.length == 1:
        return None
    total = seg.start + seg.length
    q_pos = torch.arange(seg.start, total).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(total).unsqueeze(0)  # (1, start+T)
    mask = k_pos <= q_pos  # (T, start+T) bool
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


# ---------------------------------------------------------------------------------------------------- MLP


def activation(name: str):
    """The gated MLP's activation by its HF name (config.ACTIVATIONS)."""
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"activation {name!r} is not implemented")  # config.py refuses it at reading


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.f = intermediate  # gate_up_proj's rows: f of gate_proj, then f of up_proj
        self.act = activation(act)
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)  # rows: gate_proj then up_proj
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._modules  # not self.gate_up_proj etc.: see LlamaBlock.forward
        gate_up = mods["gate_up_proj"].forward(x)  # (N, 2F)
        # two slices rather than .chunk(2): chunk goes through split and narrow, ~3x the per-call cost
        return mods["down_proj"].forward(self.act(gate_up[:, : self.f]) * gate_up[:, self.f :])  # (N, D)


class SparseMoE(nn.Module):
    """A routed mixture of gated-MLP experts: each row goes through its top-k experts, weighted by the router.

    The router (`gate`, E x D) stays float32 whatever the stage's format (it is tiny, and a routing decision
    flipped by rounding changes which weights run); the experts are ordinary linear layers in the stage's
    format (int4/int8 through the low-bit layers). Only the experts some row was routed to are computed.
    """

    def __init__(
        self, hidden: int, intermediate: int, n_experts: int, top_k: int, normalize: bool, act: str = "silu"
    ) -> None:
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(hidden, intermediate, act) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) in the compute dtype -> (N, D) float32."""
        probs = F.softmax(self._modules["gate"].forward(x.float()), dim=-1)  # (N, E) float32
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)  # as transformers: the routing weights in the activations' dtype
        out = torch.zeros(x.shape, dtype=torch.float32)
        experts = self._modules["experts"]
        if x.shape[0] == 1:  # a decode row: k experts, no gathers
            for slot, e in enumerate(chosen[0].tolist()):
                out += (experts[e].forward(x) * weights[0, slot]).float()
            return out
        for e in torch.unique(chosen).tolist():
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            y = experts[e].forward(x[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y.float())
        return out
