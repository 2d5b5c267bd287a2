"""A stage of a decoder: a contiguous layer range of one of the families in node/model/ (config.FAMILIES).

The stage takes a *packed* batch (blocks.Segment); linear layers run once over all rows, attention per
segment against the segment's cache. Layers keep their global index (`layers.12.self_attn.o_proj.weight`),
so a stage loads only its own tensors by name. The family of the checkpoint (`config.family`, from
config.json's `model_type` or GGUF's `general.architecture`) picks the block (llama.py, qwen3.py, gemma3.py,
phi3.py, mixtral.py, qwen3_moe.py); everything outside this package sees only `Stage`.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch
from torch import nn

from edgeshard.node.model.blocks import FUSED, Attention, RMSNorm, Rotaries, Rotary, Segment, apply_rotary
from edgeshard.node.model.config import FULL, ModelConfig, ShardSpec
from edgeshard.node.model.fused import FusedDecode
from edgeshard.node.model.kv_cache import KVCache

__all__ = ["FUSED", "Attention", "RMSNorm", "Rotaries", "Rotary", "Segment", "Stage", "apply_rotary"]
log = logging.getLogger("edgeshard.node")


def family_module(config: ModelConfig) -> ModuleType:
    """The node/model/ module of the config's family: its Block, FUSED names, EMBED_SCALE, NORM_PLUS_ONE."""
    return importlib.import_module(f"edgeshard.node.model.{config.family}")


def native_decode_supported(config: ModelConfig) -> bool:
    """Whether the whole-stage native decode call (fused.py, node/lowbit/csrc/decode.c) computes this architecture.

    It covers the Llama family (llama, mistral, qwen2) without sliding windows; every other architecture
    runs on the torch module path (the node says so when it loads a shard: loader.load_stage). This is the
    one gate to widen when the native path learns more families.
    """
    return config.family == "llama" and not config.layer_types


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
        family = family_module(config)
        self.layers = nn.ModuleDict({str(i): family.Block(config, i, dtype) for i in spec.layers})
        if spec.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_tables()
        self._fused: FusedDecode | None | object = _UNBUILT  # see fused_decode()

    def init_tables(self) -> None:
        """(Re)build the state that is not a weight: rotary tables and the embedding scale (the loader calls
        this after building the stage on the meta device).

        Built on the CPU whatever device is current: computed under `torch.device("meta")` (the loader builds
        the stage there) the float ops of `rope_inv_freq` go through torch's meta decompositions, whose first
        use imports torch._dynamo and sympy: ~0.9 s and ~70 MB resident for the node's lifetime (measured with
        benchmarks/bigmodel.py), for tables of a few KB that are rebuilt right after anyway."""
        with torch.device("cpu"):
            self.rotary = Rotaries(self.config)
        # Gemma: embeddings times sqrt(D), as transformers computes it (a float32 scalar tensor)
        scaled = family_module(self.config).EMBED_SCALE
        self.embed_scale = torch.tensor(self.config.hidden_size**0.5, device="cpu") if scaled else None

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
            x = self.embed_tokens(inputs).float()  # (N,) -> (N, D) float32 residual stream (see llama.Block)
            if self.embed_scale is not None:
                x = x * self.embed_scale
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
        logits = self.lm_head(self.norm(x)).float()  # (S or N, V)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _forward_modules(self, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """The layers through the torch modules: x (N, D) float32 -> (N, D) float32."""
        rope = self.rotary.tables(segments, self.dtype)  # {layer type: (cos, sin)}, (N, 1, hd) each
        for local, block in enumerate(self.layers.values()):
            x = block.forward(x, rope, segments, local)  # .forward: see Block.forward
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
        cos, sin = (
            t.reshape(len(dsegs), -1).contiguous() for t in self.rotary.tables(dsegs, self.dtype)[FULL]
        )
        fused.run(xd, [s.cache for s in dsegs], [s.start for s in dsegs], cos, sin)
        if not rest:
            return xd
        rest_rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in rest])
        out = torch.empty_like(x)
        out[rows] = xd
        out[rest_rows] = self._forward_modules(x[rest_rows], [segments[i] for i in rest])
        return out

    def fused_decode(self) -> FusedDecode | None:
        """The native decode path for this stage's weights (node/model/fused.py), built on first use; None when the
        stage cannot use it. Call `refresh_fused()` after replacing or moving weights."""
        if self._fused is _UNBUILT:
            self._fused = FusedDecode.build(self) if native_decode_supported(self.config) else None
        return self._fused

    def refresh_fused(self) -> None:
        """Forget the native path's weight pointers (rebuilt on the next forward)."""
        self._fused = _UNBUILT


_UNBUILT = object()
