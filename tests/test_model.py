"""The decoder and loaders against transformers: the real GGUF and tiny random safetensors checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

from edgeshard.node.model.config import ShardSpec, UnsupportedModelError, even_split
from edgeshard.node.model.decoder import Segment, Stage
from edgeshard.node.weights.checkpoint import CheckpointError, open_checkpoint
from edgeshard.node.weights.loader import load_stage, stage_weight_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# Token ids of a few varied prompts (the tokenizer has its own tests; fixed ids keep these independent).
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 8411, 30],
    [
        1,
        9690,
        198,
        2683,
        359,
        253,
        5356,
        5646,
        11173,
        3365,
        3717,
        7018,
        2,
        198,
        1,
        4093,
        198,
        1780,
        314,
        260,
        3458,
        282,
        4649,
        47,
        2,
        198,
        1,
        520,
        9531,
        198,
    ],
    [32, 3, 17, 42, 48000, 999, 12, 12, 12, 7, 100, 2000, 30000, 5],
]


def full_logits(stages: list[Stage], ids: list[int]) -> torch.Tensor:
    """Logits of every position, running the stages one after another on the whole prompt."""
    x = torch.tensor(ids)
    for stage in stages:
        x = stage(x, [Segment(stage.new_cache(), 0, len(ids))], all_logits=True)
    return x


@pytest.fixture(scope="module")
def gguf_ckpt(smollm2_path):
    return open_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def full_f32(gguf_ckpt):
    return load_stage(gguf_ckpt, ShardSpec.full(30), quant="f32")


@pytest.fixture(scope="module")
def hf_reference(smollm2_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


def test_gguf_config(gguf_ckpt):
    c = gguf_ckpt.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.rope_theta == 100000.0


@pytest.mark.slow
@pytest.mark.parametrize("ids", PROMPTS)
def test_gguf_logits_match_transformers(full_f32, hf_reference, ids):
    ours = full_logits([full_f32], ids)
    with torch.no_grad():
        ref = hf_reference(torch.tensor([ids])).logits[0]
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-4, f"relative logits error {rel:.2e}"
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()


@pytest.mark.slow
def test_greedy_tokens_match_transformers(full_f32, hf_reference):
    from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
    from edgeshard.node.model.sampling import SamplingParams

    prompt = PROMPTS[1]
    with torch.no_grad():
        ref = hf_reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    expected = ref[0, len(prompt) :].tolist()
    assert len(expected) == 32 and 2 not in expected  # no early end-of-sequence: all 32 compared
    pipe = LocalPipeline([ShardExecutor(full_f32)])
    pipe.open("s", SamplingParams())
    ours, token = [], pipe.step("s", 0, prompt)
    for pos in range(len(prompt), len(prompt) + 31):
        ours.append(token)
        token = pipe.step("s", pos, [token])
    ours.append(token)
    assert ours == expected


@pytest.mark.slow
@pytest.mark.parametrize("n_stages", [2, 3, 5])
def test_split_matches_unsplit(gguf_ckpt, full_f32, n_stages):
    stages = [load_stage(gguf_ckpt, spec, quant="f32") for spec in even_split(30, n_stages)]
    for ids in PROMPTS[:2]:
        torch.testing.assert_close(
            full_logits(stages, ids), full_logits([full_f32], ids), rtol=1e-5, atol=1e-4
        )


def test_incremental_decode_matches_full_forward(full_f32):
    ids = PROMPTS[1]
    full = full_logits([full_f32], ids)
    cache = full_f32.new_cache()
    full_f32(torch.tensor(ids[:10]), [Segment(cache, 0, 10)])
    steps = [full_f32(torch.tensor([t]), [Segment(cache, 10 + i, 1)])[0] for i, t in enumerate(ids[10:])]
    torch.testing.assert_close(torch.stack(steps), full[10:], rtol=1e-5, atol=1e-4)


def test_packed_batch_equals_separate_sequences(full_f32):
    """Two sequences in one packed step give the logits each gives alone (decode row and prefill chunk)."""
    a, b = PROMPTS[0], PROMPTS[2]
    ca, cb = full_f32.new_cache(), full_f32.new_cache()
    full_f32(torch.tensor(a[:-1]), [Segment(ca, 0, len(a) - 1)])
    out = full_f32(torch.tensor([a[-1]] + b), [Segment(ca, len(a) - 1, 1), Segment(cb, 0, len(b))])
    torch.testing.assert_close(out[0], full_logits([full_f32], a)[-1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[1], full_logits([full_f32], b)[-1], rtol=1e-5, atol=1e-4)


def test_shard_holds_only_its_layers(gguf_ckpt, full_f32):
    first = load_stage(gguf_ckpt, ShardSpec(0, 10, 30), quant="f32")
    assert set(first.layers) == {str(i) for i in range(10)}
    assert not hasattr(first, "lm_head") and not hasattr(first, "norm")
    c = gguf_ckpt.config
    per_layer = 4 * (
        c.hidden_size * (2 * c.hidden_size + 2 * c.num_key_value_heads * c.head_dim)
        + 3 * c.hidden_size * c.intermediate_size
        + 2 * c.hidden_size
    )
    expected = 10 * per_layer + 4 * c.vocab_size * c.hidden_size
    assert stage_weight_bytes(first) == expected
    assert stage_weight_bytes(first) < 0.6 * stage_weight_bytes(full_f32)


def test_truncated_gguf_is_a_clear_error(smollm2_path, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        bad.write_bytes(src.read(20_000_000))
    with pytest.raises(CheckpointError, match="truncated|not a readable GGUF"):
        open_checkpoint(bad)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="junk.gguf"):
        open_checkpoint(tmp_path / "junk.gguf")


# ------------------------------------------------------------------- tiny random safetensors checkpoints


def _tiny(kind: str, tmp_path, **extra):
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    common.update(extra)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(**common), transformers.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if kind == "qwen2":  # random biases so the bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    return model


@pytest.mark.parametrize(
    "kind,extra", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("mistral", {})]
)
def test_tiny_safetensors_match_transformers(tmp_path, kind, extra):
    model = _tiny(kind, tmp_path, **extra)
    assert (tmp_path / "model.safetensors.index.json").exists() or len(
        list(tmp_path.glob("*.safetensors"))
    ) == 1
    ckpt = open_checkpoint(tmp_path)
    ids = [5, 17, 250, 3, 99, 42, 42, 7]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    unsplit = full_logits([load_stage(ckpt, ShardSpec.full(4))], ids)
    split = full_logits([load_stage(ckpt, s) for s in even_split(4, 3)], ids)
    torch.testing.assert_close(unsplit, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split, ref, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        open_checkpoint(tmp_path)


def test_missing_tensor_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny("llama", tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(f).items() if "layers.2.mlp.up_proj" not in k}
        save_file(tensors, f, metadata={"format": "pt"})
    ckpt = open_checkpoint(tmp_path)
    load_stage(ckpt, ShardSpec(0, 2, 4))  # the shard without layer 2 still loads
    with pytest.raises(CheckpointError, match="layers.2.mlp.up_proj"):
        load_stage(ckpt, ShardSpec(2, 4, 4))


def test_shard_spec_errors():
    with pytest.raises(ValueError, match="not inside"):
        ShardSpec(5, 3, 30)
    assert [s.end_layer - s.start_layer for s in even_split(30, 4)] == [8, 8, 7, 7]


@pytest.mark.parametrize("quant", ["int4", "bf16"])
def test_low_bit_split_is_bit_identical(gguf_ckpt, quant):
    """The float32 residual crosses stage boundaries unrounded, so a split equals the unsplit model exactly."""
    ids = PROMPTS[0]
    unsplit = full_logits([load_stage(gguf_ckpt, ShardSpec.full(30), quant=quant)], ids)
    split = full_logits([load_stage(gguf_ckpt, s, quant=quant) for s in even_split(30, 3)], ids)
    assert torch.equal(unsplit, split)
