"""Sampling: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import pytest
import torch

from edgeshard.node.model.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingParams())(logits) == 1


def test_same_seed_same_tokens_other_seed_differs():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.5, seed=7)
    a = [Sampler(params)(logits) for _ in range(1)]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1(logits) for _ in range(50)]
    seq2 = [s2(logits) for _ in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    s3 = Sampler(SamplingParams(temperature=1.5, seed=8))
    assert [s3(logits) for _ in range(50)] != seq1


def test_top_k_keeps_only_k_best():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    s = Sampler(SamplingParams(temperature=10.0, top_k=2, seed=0))
    assert {s(logits) for _ in range(200)} == {0, 1}


def test_top_p_keeps_nucleus():
    # probabilities ~ 0.64, 0.24, 0.09, 0.03: p=0.8 keeps the first two tokens only
    logits = torch.log(torch.tensor([0.64, 0.24, 0.09, 0.03]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    assert {s(logits) for _ in range(300)} == {0, 1}


def test_temperature_distribution_follows_softmax():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    s = Sampler(SamplingParams(temperature=1.0, seed=3))
    draws = torch.tensor([s(logits) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / 3000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -3},
        {"top_k": 2**32},  # the wire's uint32
        {"seed": -(2**63) - 1},  # the wire's int64 (found by the HTTP fuzz test: it was a 503)
        {"seed": 2**63},
    ],
)
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
    SamplingParams(seed=-(2**63)), SamplingParams(seed=2**63 - 1), SamplingParams(top_k=2**32 - 1)


def test_positional_draws_do_not_depend_on_history():
    """A replayed sequence (fresh sampler, same seed) draws the same token at the same position."""
    logits = torch.randn(500, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, seed=11)
    run = Sampler(params)
    tokens = [run(logits, pos) for pos in range(40, 60)]
    replayed = Sampler(params)
    assert [replayed(logits, pos) for pos in range(50, 60)] == tokens[10:]
    assert len(set(tokens)) > 3  # really sampling, not a constant
