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

from edgeshard.node.model.config import ModelConfig, ShardSpec
from edgeshard.node.model.fused import FusedDecode
from edgeshard.node.model.kv_cache import KVCache


@dataclass
class Segment:
    """The rows of one sequence inside a packed batch."""

    cache: KVCache  # this sequence's cache on this stage
    start: int  # position of the segment's first row in the sequence
    length: int  # rows (tokens) in the segment


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 as the reference implementation does; returns `out_dtype`."""

    def __init__(self, dim: int, eps: float, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.out_dtype = out_dtype  # the stage's compute dtype: what the linear layers after the norm take
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one call instead of five ops (pow, mean, rsqrt, two muls). A layer norm of [x, -x] is the same math
        # in one native kernel (~20% faster) but gives NaN where sum(x^2) overflows (|x| ~ 1e19 and up, as
        # a broken or hostile upstream may send), where this gives 0: the node must stay up on any finite input
        w = self._parameters["weight"]  # not self.weight: see Block.forward
        return F.rms_norm(x.float(), w.shape, w, self.eps).to(self.out_dtype)


class Rotary(nn.Module):
    """Rotary position embedding tables, extended on demand; HF `rotate_half` convention.

    `sin` is stored with its first half negated, so that rotate_half(x) * sin == x.roll(hd/2) * signed_sin:
    one roll instead of two slices, a negation and a cat per call (bit-identical products).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq = _inv_freq(config)  # (hd/2,)
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


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin. x: (N, heads, hd); cos/signed_sin: (N, 1, hd) from `Rotary.tables`.
    `out=x` rotates in place."""
    # roll by hd/2 swaps the halves: (x1, x2) -> (x2, x1); the sign of rotate_half lives in signed_sin
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin, out=out)


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
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment], layer: int
    ) -> torch.Tensor:
        N, _ = x.shape  # (N, D)
        H, hd = self.n_heads, self.head_dim
        mods = self._modules  # not self.qkv_proj etc.: see Block.forward
        qkv = mods["qkv_proj"].forward(x).view(N, -1, hd)  # (N, H+2Hkv, hd): q, k, v heads
        qk = qkv[:, : H + self.n_kv_heads]
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
        # 4-D inputs: torch's CPU SDPA takes its fused kernel for (B, H, T, hd), ~8x faster in bf16
        out = F.scaled_dot_product_attention(
            q, kv[:1], kv[1:], attn_mask=_causal_mask(seg), enable_gqa=True
        )  # (1, H, T, hd)
        # the kernel lays its output out as (1, T, H, hd): both are views, no copy
        return out.view(1, H * hd) if T == 1 else out[0].transpose(0, 1).reshape(T, H * hd)


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
        self.f = f  # gate_up_proj's rows: f of gate_proj, then f of up_proj
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=False)  # rows: gate_proj then up_proj
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._modules  # not self.gate_up_proj etc.: see Block.forward
        gate_up = mods["gate_up_proj"].forward(x)  # (N, 2F)
        # two slices rather than .chunk(2): chunk goes through split and narrow, ~3x the per-call cost
        return mods["down_proj"].forward(
            F.silu(gate_up[:, : self.f]) * gate_up[:, self.f :]
        )  # (N, F) -> (N, D)


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.

    The residual stream `x` is float32 whatever the compute dtype (as in llama.cpp): the norms hand the
    layers `dtype` inputs and the layers' outputs are added back in float32. A bf16 residual rounds the large
    activations of early positions (SmolLM2: logit norms 2-3x the others') to a coarse grid at every layer.
    Measured on tests/test_quant_model.py's prompts, float32 residuals bring the int4 logits from 3.8% to
    1.9% (relative L2) of the float32 model's and the bf16 ones from 2.3% to 1.5%, at no cost: the norms
    cast and the residual adds ran anyway.
    """

    def __init__(self, config: ModelConfig, index: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.index = index  # global layer index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment], local: int
    ) -> torch.Tensor:
        """x: (N, D) float32 residual stream -> (N, D) float32."""
        # submodules read from _modules and run by .forward: nn.Module's __getattr__ and __call__ cost ~1 us
        # each, ~20 us a layer at batch 1 where the layer's other work is ~250 us (no hooks are used here)
        m = self._modules
        h = x + m["self_attn"].forward(m["input_layernorm"].forward(x), cos, sin, segments, local)
        return h + m["mlp"].forward(m["post_attention_layernorm"].forward(h))


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
        self.layers = nn.ModuleDict({str(i): Block(config, i, dtype) for i in spec.layers})
        if spec.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        self._fused: FusedDecode | None | object = _UNBUILT  # see fused_decode()

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
        (S, V), or of every row (N, V) with all_logits; other stages return the float32 residual stream
        (N, D), which is what travels to the next stage."""
        if self.spec.is_first:
            x = self.embed_tokens(inputs).float()  # (N,) -> (N, D) float32 residual stream (see Block)
        else:
            x = inputs.float()  # (N, D)
        fused = self.fused_decode()
        if fused is not None and any(seg.length == 1 for seg in segments):
            x = self._forward_split(fused, x, segments, owned=x is not inputs)
        else:
            x = self._forward_modules(x, segments)
        for seg in segments:
            seg.cache.advance(seg.start, seg.length)
        if not self.spec.is_last:
            # float32 on the wire (2.3 KB a token for SmolLM2): a split model then computes exactly what the
            # unsplit one does, in every format, so N nodes give the same tokens as one process
            return x
        if not all_logits:  # each segment's last row: (S, D); a slice, not a gather, for a single segment
            x = x[-1:] if len(segments) == 1 else x[torch.tensor([s.length for s in segments]).cumsum(0) - 1]
        return self.lm_head(self.norm(x)).float()  # (S or N, V)

    def _forward_modules(self, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """The layers through the torch modules: x (N, D) float32 -> (N, D) float32."""
        cos, sin = self.rotary.tables(segments, self.dtype)  # (N, 1, hd)
        for local, block in enumerate(self.layers.values()):
            x = block.forward(x, cos, sin, segments, local)  # .forward: see Block.forward
        return x

    def _forward_split(
        self, fused: FusedDecode, x: torch.Tensor, segments: list[Segment], owned: bool
    ) -> torch.Tensor:
        """Decode rows (length-1 segments) through the native stage call, the others through the modules.
        The native call updates its rows in place: `owned` says x is not the caller's tensor."""
        starts = [0]
        for seg in segments:
            starts.append(starts[-1] + seg.length)
        decode = [i for i, seg in enumerate(segments) if seg.length == 1]
        rest = [i for i, seg in enumerate(segments) if seg.length != 1]
        rows = [starts[i] for i in decode]
        xd = x[rows] if rest else (x if owned else x.clone())  # (S, D): picking rows copies already
        dsegs = [segments[i] for i in decode]
        cos, sin = (t.reshape(len(dsegs), -1).contiguous() for t in self.rotary.tables(dsegs, self.dtype))
        fused.run(xd, [s.cache for s in dsegs], [s.start for s in dsegs], cos, sin)
        if not rest:
            return xd
        rest_rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in rest])
        out = torch.empty_like(x)
        out[rows] = xd
        out[rest_rows] = self._forward_modules(x[rest_rows], [segments[i] for i in rest])
        return out

    def fused_decode(self) -> FusedDecode | None:
        """The native decode path for this stage's weights (node/fused.py), built on first use; None when the
        stage cannot use it. Call `refresh_fused()` after replacing or moving weights."""
        if self._fused is _UNBUILT:
            self._fused = FusedDecode.build(self)
        return self._fused

    def refresh_fused(self) -> None:
        """Forget the native path's weight pointers (rebuilt on the next forward)."""
        self._fused = _UNBUILT


_UNBUILT = object()
