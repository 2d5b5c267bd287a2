"""Whole-model checks of the low-bit formats on the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF).

The reference is the same checkpoint dequantized to float32 (quant="f32"), which tests/test_model.py checks
against transformers. What "bf16 precision" means here is measured, not assumed: the bf16 model (bf16
weights and activations, no quantization) is the yardstick for the int4 model, whose 4-bit codes are the
file's own and whose only extra rounding is the bf16 scale and zero of each group of 32.

Logits leave the bf16 formats rounded to bf16, whose spacing is 0.125 for logits in [16, 32) and 0.25 in
[32, 64), the range of this model's top logits. Two tokens whose float32 logits differ by less than
`NEAR_TIE` (two such spacings) cannot be ranked reliably in bf16, so top-1 and greedy comparisons skip or
stop at such near-ties; every test checks that this leaves most positions compared.

Measured on this machine (1 thread; the tests assert looser bounds, see each test):
    relative L2 of the logits vs f32, 4 prompts:   bf16 0.8-1.6%   int4 1.2-2.0%   int8 2.2-5.9%
    a wrong Q4_1 mapping (zero off by half a step, or nibbles interleaved):       108-126%
    perplexity of tests/data/perplexity.txt (736 tokens):  f32 22.17, bf16 +0.16%, int4 +0.18%, int8 +0.32%
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from edgeshard.node.lowbit import layers as quant
from edgeshard.node.lowbit import native
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.decoder import Segment, Stage
from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.loader import load_stage, shard_metadata, stage_weight_bytes
from edgeshard.node.weights.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

pytestmark = pytest.mark.slow  # each test loads whole models of the real checkpoint

TEXT = Path(__file__).parent / "data" / "perplexity.txt"  # an original ~640-word English passage
NEAR_TIE = 0.25  # float32 top-2 margins (logits) below this are near-ties in bf16 (module docstring)
# The dot-product kernels of CPUs without AMX (node/lowbit/csrc/dot.c) quantize activations to int8 per 32, as
# llama.cpp does: measured int4 logits 4.2% from f32 where the bf16 model is 1.3% (torch's and the AMX
# kernels: 1.2-2.0%). Their bounds below are widened by these factors; perplexity keeps its bounds.
DOT = native.kernel_set() not in ("amx", "torch")
L2_FACTOR, TIE, DECIDED = (4, 2 * NEAR_TIE, 0.6) if DOT else (2, NEAR_TIE, 0.8)
GREEDY_TOKENS = 16


class DenseSource:
    """A checkpoint weight seen as a dense float tensor only (ggml_type None), as a safetensors weight is:
    the quantizer then re-quantizes it from float32 instead of copying the file's 4-bit codes."""

    def __init__(self, src) -> None:
        self.src, self.name, self.shape, self.ggml_type = src, src.name, src.shape, None

    def raw(self):
        raise AssertionError("a dense source has no GGUF blocks")

    def dense(self) -> torch.Tensor:
        return self.src.dense()


class DenseCheckpoint:
    """The GGUF checkpoint with every weight behind a `DenseSource`."""

    def __init__(self, ckpt) -> None:
        self.ckpt, self.path, self.config = ckpt, ckpt.path, ckpt.config

    def names(self) -> list[str]:
        return self.ckpt.names()

    def weight(self, name: str) -> DenseSource:
        return DenseSource(self.ckpt.weight(name))


@pytest.fixture(scope="module")
def ckpt(smollm2_path):
    return open_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def tokenizer(ckpt) -> Tokenizer:
    return Tokenizer.from_gguf(ckpt.reader)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Chat prompts as the CLI sends them, plain text and code: chosen up front, not for passing."""

    def chat(question: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        return tokenizer.encode(text, add_special_tokens=False)

    return [
        chat("What is the capital of France?"),
        chat("Write a short poem about the sea."),
        tokenizer.encode("The old lighthouse keeper climbed the stairs every evening to"),
        tokenizer.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ]


@pytest.fixture(scope="module")
def models(ckpt) -> dict[str, Stage]:
    """Whole-model stages, loaded on first use: f32, bf16, int8, int4 (from the Q4_1 blocks) and
    int4-requant (re-quantized from the dequantized float32 weights)."""
    loaded: dict[str, Stage] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> Stage:
            source = DenseCheckpoint(ckpt) if name == "int4-requant" else ckpt
            loaded[name] = load_stage(source, ShardSpec.full(30), quant=name.removesuffix("-requant"))
            return loaded[name]

    return Lazy()


def logits_of(stage: Stage, ids: list[int]) -> torch.Tensor:
    """Float32 logits (T, V) of every position of `ids`."""
    return stage(torch.tensor(ids), [Segment(stage.new_cache(), 0, len(ids))], all_logits=True)


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit of each row: (T,)."""
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def test_int4_from_q4_1_matches_f32_to_bf16_precision(models, prompts) -> None:
    """int4 runs the file's own 4-bit codes: its logits are as close to f32 as bf16 arithmetic allows.

    Bound: at most twice the bf16 model's relative L2 error on the same prompt (measured 1.3-1.6x: the int4
    path adds the bf16 rounding of each group's scale and zero, an error shared by 32 weights), and top-1
    equal to f32 at every position that is not a near-tie. A wrong mapping of the Q4_1 blocks lands at
    >100% (checked in test_a_wrong_q4_mapping_fails_the_bound), fifty times the bound.
    """
    compared = total = 0
    for ids in prompts:
        ref = logits_of(models["f32"], ids)
        int4, bf16 = logits_of(models["int4"], ids), logits_of(models["bf16"], ids)
        assert rel_l2(int4, ref) <= L2_FACTOR * rel_l2(bf16, ref), (rel_l2(int4, ref), rel_l2(bf16, ref))
        decided = top2_margin(ref) >= TIE
        agree = int4.argmax(-1) == ref.argmax(-1)
        assert agree[decided].all(), f"top-1 differs at decided positions {(~agree & decided).nonzero()}"
        compared += int(decided.sum())
        total += len(ids)
    assert compared >= DECIDED * total  # near-ties are rare: the top-1 check is not vacuous


def test_a_wrong_q4_mapping_fails_the_bound(ckpt, models, prompts, monkeypatch) -> None:
    """The bound above catches a plausible mapping bug: the Q4_1 zero point off by half a step."""
    exact = quant._q4_codes

    def half_step_off(raw, ggml_type, in_features):
        q, scale, minv = exact(raw, ggml_type, in_features)
        return q, scale, minv + 0.5 * scale

    monkeypatch.setattr(quant, "_q4_codes", half_step_off)
    wrong = load_stage(ckpt, ShardSpec.full(30), quant="int4")
    ids = prompts[0]
    ref = logits_of(models["f32"], ids)
    assert rel_l2(logits_of(wrong, ids), ref) > 10 * 2 * rel_l2(logits_of(models["bf16"], ids), ref)


def perplexity(stage: Stage, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] given the preceding tokens, in one forward pass."""
    logits = logits_of(stage, ids)[:-1]
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())


def test_perplexity_int8_within_1pct_int4_requant_within_5pct(models, tokenizer) -> None:
    """On a fixed English passage: int8 within 1% of f32, int4 re-quantized from float32 within 5%.

    The requantized int4 model goes through the float path of the quantizer (min/max per group of 32), not
    the Q4_1 block copy. Caveat: its float32 weights are themselves dequantized Q4_1, whose grid the min/max
    quantizer recovers almost exactly, so this bound is loose here; a float checkpoint would be the real test.
    """
    ids = tokenizer.encode(TEXT.read_text())
    assert len(ids) > 600
    ppl = {name: perplexity(models[name], ids) for name in ("f32", "int8", "int4-requant")}
    assert 5 < ppl["f32"] < 60, ppl  # sane: the model reads English (a wrong model scores in the thousands)
    assert abs(ppl["int8"] / ppl["f32"] - 1) < 0.01, ppl
    assert abs(ppl["int4-requant"] / ppl["f32"] - 1) < 0.05, ppl


def greedy(stage: Stage, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens through the executor path `run --local` uses, with the top-2 margin of each choice."""
    pipe = LocalPipeline([ShardExecutor(stage)])
    pipe.open("s", SamplingParams())
    tokens: list[int] = []
    token = pipe.step("s", 0, prompt)
    for pos in range(len(prompt), len(prompt) + n):
        tokens.append(token)
        token = pipe.step("s", pos, [token])
    pipe.close("s")
    # margins of f32's own choices, from one forward over prompt + continuation
    logits = logits_of(stage, prompt + tokens)[len(prompt) - 1 : -1]
    return tokens, top2_margin(logits).tolist()


def test_int8_greedy_equals_f32(models, prompts) -> None:
    """int8 generates f32's greedy tokens for 16 steps, or departs from them only at a near-tie.

    Measured (32 steps): the France prompt agrees throughout; the poem departs at step 19 (f32 margin 0.045),
    the lighthouse text at step 13 (0.066) and the code at step 6 (0.10, where the unquantized bf16 model
    departs too). Each stop is a tie that bf16 logits cannot resolve, not a quantization error.
    """
    exact = 0
    for ids in prompts:
        ref, margins = greedy(models["f32"], ids, GREEDY_TOKENS)
        ours, _ = greedy(models["int8"], ids, GREEDY_TOKENS)
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if first_diff is None:
            exact += 1
        else:
            assert margins[first_diff] < TIE, (first_diff, margins[first_diff], ours, ref)
            assert first_diff >= 4, (first_diff, ours, ref)  # not a model that diverges at once
    assert exact >= 1


def test_int4_shard_holds_under_0_3x_of_fp32(ckpt) -> None:
    """A node running int4 holds at most 0.3x the weight bytes of the same shard in fp32 (middle and last).

    Layers cost ~0.16x (4-bit codes + bf16 scale and zero per 32); the last stage also holds the head, int8
    in an int4 stage (quant.end_quant), which brings it to ~0.2x.
    """
    for spec in (ShardSpec(10, 20, 30), ShardSpec(20, 30, 30)):
        int4 = stage_weight_bytes(load_stage(ckpt, spec, quant="int4"))
        f32 = stage_weight_bytes(load_stage(ckpt, spec, quant="f32"))
        assert int4 <= 0.3 * f32, (spec, int4 / f32)


def test_shard_metadata_records_the_format(ckpt) -> None:
    """Bits and group size of every kind of module, and bytes that add up to the shard's."""
    first = load_stage(ckpt, ShardSpec(0, 2, 30), quant="int4")
    meta = shard_metadata(first)
    assert json.loads(json.dumps(meta)) == meta  # plain data, ready for GetInfo / the planner
    assert (meta["start_layer"], meta["end_layer"], meta["num_layers"]) == (0, 2, 30)
    assert meta["quant"] == "int4" and meta["compute_dtype"] == "bfloat16"
    kinds = {m["kind"]: m for m in meta["modules"]}
    assert len(kinds) == len(meta["modules"]) == 3  # one format per kind: embedding, linear, norm
    assert {k: (m["format"], m["bits"], m["scale"], m["group_size"]) for k, m in kinds.items()} == {
        "embedding": ("int8", 8, "group", 32),  # Q8_0's own codes and scales
        "linear": ("int4", 4, "group", 32),
        "norm": ("f32", 32, "none", 0),
    }
    assert kinds["linear"]["count"] == 2 * 4 and kinds["norm"]["count"] == 2 * 2
    assert sum(m["bytes"] for m in meta["modules"]) == meta["weight_bytes"] == stage_weight_bytes(first)

    last = shard_metadata(load_stage(ckpt, ShardSpec(29, 30, 30), quant="f32"))
    assert {m["kind"]: m["format"] for m in last["modules"]} == {
        "linear": "f32",
        "norm": "f32",
        "head": "f32",
    }
    assert last["compute_dtype"] == "float32"
