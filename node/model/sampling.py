"""Next-token sampling: greedy, temperature, top-k, top-p, with a per-sequence seeded generator.

The last stage samples, so sampling parameters travel with the session. The same seed gives the same
tokens: each draw is seeded from (seed, position), so the token at a position does not depend on how many
draws came before. A sequence replayed onto a fresh node after a failure therefore samples exactly what the
uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K_LIMIT = 2**32  # top_k < this: a uint32 on the wire (SamplingParams in the proto)
SEED_LIMIT = 2**63  # -SEED_LIMIT <= seed < SEED_LIMIT: an int64 on the wire


@dataclass(frozen=True)
class SamplingParams:
    """How to choose the next token."""

    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p
    seed: int | None = None  # same seed, same output; None draws a random seed

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # written so that NaN fails too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < TOP_K_LIMIT:
            raise ValueError(f"top_k must be in [0, 2**32), got {self.top_k}")
        if self.seed is not None and not -SEED_LIMIT <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must fit in 64 bits (-2**63 to 2**63-1), got {self.seed}")

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax."""
        return self.temperature == 0.0


class Sampler:
    """Draws tokens for one sequence; holds that sequence's random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.generator.manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor, position: int | None = None) -> int:
        """logits: (V,) float -> the chosen token id for the token at `position` of the sequence.

        With a position, the draw depends only on (seed, position); without, draws follow one another.
        """
        if self.params.greedy:
            return _argmax(logits)
        probs = self._probs(logits, position)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def verify(self, logits: torch.Tensor, draft: list[int], start: int) -> list[int]:
        """Check proposed tokens: the accepted prefix of `draft`, then one token of the model's own.

        logits: (k+1, V), row j computed after the token at position `start + j`; draft: the k proposals for
        positions start+1 .. start+k. Greedy: a proposal is accepted while it is the argmax, so the output is
        exactly what one-token steps would give. Sampling: the proposals are deterministic (prompt lookup, a
        greedy draft model), so the standard rule (accept d with probability min(1, p(d) / q(d)), q(d) = 1;
        on a rejection draw from p with d removed, renormalized) makes every token follow the model's
        distribution p, whatever was proposed. Each position's draws use the generator seeded by
        (seed, position), so a replay repeats them.
        """
        if logits.dim() != 2 or logits.shape[0] != len(draft) + 1:
            raise ValueError(f"verify needs {len(draft) + 1} rows of logits, got {tuple(logits.shape)}")
        out: list[int] = []
        for j, proposed in enumerate([*draft, None]):
            position = start + j + 1
            if self.params.greedy:
                token = _argmax(logits[j])
                out.append(token)
                if token != proposed:
                    break
                continue
            probs = self._probs(logits[j], position)
            if proposed is None:  # every proposal accepted: the next token is the model's own draw
                out.append(int(torch.multinomial(probs, 1, generator=self.generator)))
                break
            accept = float(probs[proposed])
            if float(torch.rand((), generator=self.generator, dtype=torch.float64)) < accept:
                out.append(proposed)
                continue
            rest = probs.clone()
            rest[proposed] = 0.0
            if float(rest.sum()) <= 0.0:  # p put all its mass on the proposal (rounding): it stands
                out.append(proposed)
                continue
            out.append(int(torch.multinomial(rest / rest.sum(), 1, generator=self.generator)))
            break
        return out

    def _probs(self, logits: torch.Tensor, position: int | None) -> torch.Tensor:
        """The distribution to draw from (temperature, top-k, top-p applied), with the generator seeded for
        `position` (when given)."""
        p = self.params
        if position is not None:
            self.generator.manual_seed((self.seed * 1_000_003 + position) % 2**63)
        logits = logits.float()
        scaled = logits / p.temperature
        if not torch.isfinite(scaled).all():
            # a tiny temperature overflows (or is 0 in float32) and softmax gives NaN; shifted by the max and
            # in float64 it is the same distribution, finite for any temperature > 0
            scaled = (logits.double() - logits.max()) / p.temperature
        logits = scaled
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            # drop a token when the ones before it already reach top_p (always keep the best one)
            drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
        return torch.softmax(logits, -1)


def _argmax(logits: torch.Tensor) -> int:
    """The first maximum (a NaN counts as the maximum), as torch.argmax."""
    if logits.dtype == torch.float32:
        # numpy's argmax: ~8 us over a 49152-entry vocabulary where torch.argmax takes ~110 (1 thread)
        return int(logits.detach().numpy().argmax())
    return int(torch.argmax(logits))
