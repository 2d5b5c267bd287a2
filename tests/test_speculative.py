"""Speculative decoding (coordinator/pipeline/speculative.py, Sampler.verify): greedy output equals greedy
output without it, token for token, for both draft sources on 1 and 3 nodes; with sampling, tokens follow
the model's distribution (a goodness-of-fit test over many seeded draws on a tiny model)."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path

import pytest
import torch

from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline, Sequence, generate
from edgeshard.coordinator.pipeline.speculative import ModelDraft, NgramDraft, Speculation
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
from edgeshard.node.model.sampling import Sampler, SamplingParams
from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.loader import load_stage
from edgeshard.node.weights.tokenizer import Tokenizer

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He polished the great lens, "
    "trimmed the wick, and lit the lamp so that ships far out at sea could find their way past the rocks."
)
GROUNDED = f"Repeat this passage exactly:\n{PASSAGE}\nRepeated passage:\n"


def _local(path: Path, quant: str, stages: int = 1) -> LocalPipeline:
    ckpt = open_checkpoint(path)
    n = ckpt.config.num_hidden_layers
    bounds = [round(i * n / stages) for i in range(stages + 1)]
    specs = [ShardSpec(a, b, n) for a, b in itertools.pairwise(bounds)]
    return LocalPipeline([ShardExecutor(load_stage(ckpt, s, quant=quant)) for s in specs])


def _run(
    pipeline, prompt: list[int], max_tokens: int, spec: Speculation | None = None, **sampling
) -> list[int]:
    seq = Sequence(prompt, SamplingParams(**sampling), max_tokens, speculation=spec)

    async def go() -> list[int]:
        return [t async for t in generate(pipeline, seq)]

    out = asyncio.run(go())
    assert out == seq.generated
    return out


@pytest.fixture(scope="module")
def smol(smollm2_path):
    tok = Tokenizer.from_checkpoint(smollm2_path)
    return tok, tok.encode(GROUNDED)


@pytest.fixture(scope="module")
def f32_pipeline(smollm2_path):
    return AsyncLocalPipeline(_local(smollm2_path, "f32"))


def test_ngram_proposes_what_followed_the_last_match():
    d = NgramDraft(min_n=2, max_n=3)
    ctx = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert d.lookup("s", ctx, 3) == [8, 9, 1]  # "5 6 7" seen before: what followed it
    assert d.lookup("s", [*ctx, 8, 9, 1, 5, 6], 2) == [7, 8]  # the index grows with the sequence
    assert d.lookup("t", [1, 2, 3, 4], 4) == []  # nothing repeats: no proposal (and no cost)
    assert d.lookup("t", [1, 2, 3, 1, 2], 0) == []


def test_sampler_verify_greedy_is_the_argmax_chain():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    best = logits.argmax(-1).tolist()
    s = Sampler(SamplingParams())
    assert s.verify(logits, best[:3], 10) == best  # all accepted, plus the model's own token
    assert s.verify(logits, [best[0], (best[1] + 1) % 50, best[2]], 10) == best[:2]  # stops at the mismatch
    with pytest.raises(ValueError, match="rows of logits"):
        s.verify(logits, [1], 0)


@pytest.mark.parametrize("source", ["ngram", "model"])
def test_greedy_equal_with_and_without_speculation_one_process(smollm2_path, smol, f32_pipeline, source):
    """f32 target; the draft is prompt lookup, or the int4 SmolLM2 drafting for its own f32 version."""
    tok, prompt = smol
    plain = _run(f32_pipeline, prompt, 48)
    draft = NgramDraft() if source == "ngram" else ModelDraft(_local(smollm2_path, "int4"), "smollm2-int4")
    spec = Speculation(draft, k=4)
    fast = _run(f32_pipeline, prompt, 48, spec)
    assert fast == plain, (tok.decode(plain), tok.decode(fast))
    assert spec.proposed > 0 and spec.accepted > 0  # it really checked proposals, and some held
    if source == "model":
        assert not draft._fed  # the draft model's session was freed with the sequence


def test_greedy_equal_split_over_three_stages(smollm2_path, smol):
    """Rejected proposals leave stale positions in every stage's cache: the next step must overwrite them."""
    tok, prompt = smol
    split = AsyncLocalPipeline(_local(smollm2_path, "f32", stages=3))
    plain = _run(split, prompt, 40)
    spec = Speculation(NgramDraft(), k=6)
    assert _run(split, prompt, 40, spec) == plain
    assert 0 < spec.accepted < spec.proposed or spec.accepted == spec.proposed > 0


@pytest.mark.slow
@pytest.mark.parametrize("source", ["ngram", "model"])
def test_greedy_equal_over_three_nodes(smollm2_path, smol, node_cluster, source):
    """Real node processes: proposals travel in ForwardMessage.draft, the last node answers Result.tokens."""
    from edgeshard.coordinator.pipeline.deploy import deploy

    tok, prompt = smol

    async def go() -> tuple[list[int], list[int], Speculation]:
        dep = await deploy(node_cluster.addresses, Path(smollm2_path).name, 30, "f32")
        pipe = await dep.pipeline()
        try:
            draft = NgramDraft() if source == "ngram" else ModelDraft(_local(smollm2_path, "int4"))
            spec = Speculation(draft, k=4)
            seqs = [
                Sequence(prompt, SamplingParams(), 32),
                Sequence(prompt, SamplingParams(), 32, speculation=spec),
            ]
            outs = []
            for seq in seqs:
                outs.append([t async for t in generate(pipe, seq)])
            return outs[0], outs[1], spec
        finally:
            await pipe.aclose()
            await dep.close()

    plain, fast, spec = asyncio.run(go())
    assert fast == plain, (tok.decode(plain), tok.decode(fast))
    assert spec.accepted > 0


def _chi2_limit(dof: int, z: float = 3.09) -> float:
    """The 99.9% quantile of chi-square(dof) (Wilson-Hilferty): a correct sampler fails 1 run in 1000."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi2(counts: dict[int, int], probs: torch.Tensor, n: int) -> tuple[float, int]:
    cells = [(i, float(p)) for i, p in enumerate(probs) if n * float(p) >= 5]
    rest = n - sum(counts.get(i, 0) for i, _ in cells)
    rest_p = 1.0 - sum(p for _, p in cells)
    stat = sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in cells)
    if n * rest_p >= 5:
        stat += (rest - n * rest_p) ** 2 / (n * rest_p)
        return stat, len(cells)
    return stat, len(cells) - 1


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_with_speculation_follows_the_model_distribution(top_p):
    """The accept/reject rule: over 20,000 seeded draws, the first token follows the model's distribution at
    its row, and so does the second, given that the first accepted the proposal (chi-square goodness of fit).
    The proposals are fixed and often wrong: the rule must correct for them."""
    torch.manual_seed(3)
    logits = torch.randn(3, 12) * 2.0
    draft = [int(torch.argsort(logits[0])[-2]), int(torch.argsort(logits[1])[-3])]  # plausible, not the best
    params = dict(temperature=0.9, top_p=top_p)
    probe = Sampler(SamplingParams(**params, seed=0))
    p0, p1 = probe._probs(logits[0], None), probe._probs(logits[1], None)
    n = 20_000
    first: dict[int, int] = {}
    second: dict[int, int] = {}
    for seed in range(n):
        out = Sampler(SamplingParams(**params, seed=seed)).verify(logits, draft, 7)
        first[out[0]] = first.get(out[0], 0) + 1
        if out[0] == draft[0]:
            second[out[1]] = second.get(out[1], 0) + 1
    stat, dof = _chi2(first, p0, n)
    assert stat < _chi2_limit(dof), (stat, dof, first, p0)
    m = sum(second.values())
    assert abs(m / n - float(p0[draft[0]])) < 4 * math.sqrt(float(p0[draft[0]]) / n)  # accepted as often as p
    stat, dof = _chi2(second, p1, m)
    assert stat < _chi2_limit(dof), (stat, dof, second, p1)


def test_the_goodness_of_fit_test_can_fail():
    """Accepting every proposal (a broken rule) is caught by the same statistic."""
    torch.manual_seed(3)
    logits = torch.randn(3, 12) * 2.0
    p0 = torch.softmax(logits[0] / 0.9, -1)
    wrong = int(torch.argsort(logits[0])[-2])
    stat, dof = _chi2({wrong: 20_000}, p0, 20_000)
    assert stat > _chi2_limit(dof)


def test_seeded_speculative_sampling_repeats(tiny_pipeline):
    """End to end on a tiny model: with a seed, speculative sampling gives the same tokens twice, and valid
    ones (the draws depend only on seed and position)."""
    pipe = AsyncLocalPipeline(tiny_pipeline)

    class FixedDraft:
        name = "fixed"

        async def propose(self, key, context, k):
            return [(context[-1] * 3 + i + 1) % 6 for i in range(k)]

        def forget(self, key):
            pass

    runs = [
        _run(pipe, [1, 4, 2], 12, Speculation(FixedDraft(), k=3), temperature=1.0, seed=5) for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 12 and all(0 <= t < 6 for t in runs[0])


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A random 6-token-vocabulary Llama (made by transformers, loaded by edgeshard in f32)."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-spec")
    cfg = transformers.LlamaConfig(
        vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return _local(path, "f32")
