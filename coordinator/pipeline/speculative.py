"""Speculative decoding: propose several tokens, check them all in one trip through the ring.

In a pipeline one token must pass every node in turn, and a decode step on a cheap CPU is bound by reading
the weights, so checking k+1 rows costs little more than one. The coordinator proposes k tokens, sends the
last accepted token and the proposals as one step (`Pipeline.verify`), and the last node accepts the longest
prefix the model agrees with and adds one token of its own (node/model/sampling.py `Sampler.verify`): every
trip yields 1 to k+1 tokens. Greedy output is exactly what one-token steps give; with sampling, every token
follows the model's distribution (the standard accept/reject rule; proposals here are deterministic).

Two draft sources, chosen per request:
- `NgramDraft` (prompt lookup): the tokens that followed the last earlier occurrence of the sequence's last
  n tokens, in the prompt or the text so far. No model, no cost when nothing matches; strong when the answer
  repeats its input (summaries, quoting, code edits, chat over a document).
- `ModelDraft`: a small model with the same tokenizer, run greedily in the coordinator's process (for
  example the int4 SmolLM2 drafting for a bigger or higher-precision target).

`Speculation` wraps a source for one sequence and adapts k to what is accepted, so a sequence whose
proposals keep failing stops paying for them.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_DRAFT_TOKENS = 4  # k a sequence starts with (run/serve --draft-tokens)
MAX_DRAFT_TOKENS = 16  # k never grows past this: a verify step's rows cost more beyond it


class DraftSource(Protocol):
    """Proposes the next tokens of a sequence (deterministically: the accept rule relies on it)."""

    name: str

    async def propose(self, key: str, context: list[int], k: int) -> list[int]:
        """Up to `k` proposed tokens to follow `context` (fewer or none when it has no good guess)."""
        ...

    def forget(self, key: str) -> None:
        """The sequence `key` is over: free what the source keeps for it."""
        ...


class NgramDraft:
    """Prompt lookup: find the sequence's last n tokens earlier in it and propose what followed them.

    n goes from `max_n` down to `min_n` (2 by default: a single repeated token is too weak a hint, and a
    wrong proposal costs a longer step). The most recent earlier occurrence wins. An index of every n-gram's
    last end position is kept per sequence and extended as the sequence grows, so a proposal costs O(n).
    """

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, tuple[list[int], dict[tuple[int, ...], int]]] = {}

    async def propose(self, key: str, context: list[int], k: int) -> list[int]:
        return self.lookup(key, context, k)

    def lookup(self, key: str, context: list[int], k: int) -> list[int]:
        """The synchronous core of `propose`."""
        if k < 1:
            return []
        seen, index = self._index.setdefault(key, ([], {}))
        if context[: len(seen)] != seen:  # a different sequence under the same key: start over
            seen.clear()
            index.clear()
        # index the n-grams ending at every position but the last (the suffix must match an *earlier* one)
        for end in range(max(len(seen), 1), len(context)):
            for n in range(self.min_n, self.max_n + 1):
                if end - n >= 0:
                    index[tuple(context[end - n : end])] = end
        seen[:] = context[: len(context) - 1] if context else []
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(context) <= n:
                continue
            end = index.get(tuple(context[-n:]))
            if end is not None and end < len(context):
                return context[end : end + k]
        return []

    def forget(self, key: str) -> None:
        self._index.pop(key, None)


class ModelDraft:
    """A small model with the target's tokenizer, run greedily in this process to propose tokens.

    One executor (all the draft model's layers) serves every sequence, one session each; its KV cache is
    reused from step to step: only the tokens it has not seen (or that differ from what it proposed) are fed.
    Steps run in a worker thread under a lock (the executor is not thread-safe), so a server's event loop
    stays free.
    """

    name = "model"

    def __init__(self, local, name: str = "model") -> None:
        self.local = local  # node.model.executor.LocalPipeline over the whole draft model
        self.name = name
        self._fed: dict[str, list[int]] = {}  # per sequence: the tokens whose KV the draft cache holds
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str, quant: str | None = None, threads: int | None = None) -> ModelDraft:
        """Load `model` (a path or registry name) whole, in `quant` (default: the checkpoint's own format)."""
        from edgeshard.node.model.config import ShardSpec
        from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
        from edgeshard.node.weights.checkpoint import open_checkpoint
        from edgeshard.node.weights.loader import load_stage
        from edgeshard.node.weights.registry import resolve_model

        if threads:
            import torch

            torch.set_num_threads(threads)
        ckpt = open_checkpoint(resolve_model(model))
        stage = load_stage(ckpt, ShardSpec.full(ckpt.config.num_hidden_layers), quant=quant)
        return cls(LocalPipeline([ShardExecutor(stage)]), name=model)

    async def propose(self, key: str, context: list[int], k: int) -> list[int]:
        if k < 1 or not context:
            return []
        return await asyncio.to_thread(self._propose, key, context, k)

    def _propose(self, key: str, context: list[int], k: int) -> list[int]:
        from edgeshard.node.model.sampling import SamplingParams

        with self._lock:
            fed = self._fed.get(key)
            if fed is None:
                self.local.open(key, SamplingParams())  # greedy: proposals must be deterministic
                fed = self._fed[key] = []
            same = 0  # the cache is valid up to the first position where it differs from the context
            for a, b in zip(fed, context[:-1]):
                if a != b:
                    break
                same += 1
            limit = self.local.executors[0].max_len
            k = min(k, limit - len(context))
            if k < 1:
                return []
            token = self.local.step(key, same, context[same:])
            out = [token]
            fed[:] = context
            while len(out) < k:
                token = self.local.step(key, len(fed), [token])
                fed.append(out[-1])
                out.append(token)
            return out

    def forget(self, key: str) -> None:
        with self._lock:
            if self._fed.pop(key, None) is not None:
                self.local.close(key)


def check_same_tokenizer(target, draft) -> None:
    """Refuse a draft model whose tokenizer is not the target's (its proposals would be other tokens)."""
    probe = "Speculative decoding checks 4 tokens at once: naïve café, 日本語, print('x')\n"
    if draft.vocab_size != target.vocab_size or draft.encode(probe) != target.encode(probe):
        raise ValueError(
            "the draft model's tokenizer differs from the target's (vocabulary or encoding); use a draft "
            "model of the same family, or --speculative ngram"
        )


@dataclass
class Speculation:
    """One sequence's speculation: its draft source and an adaptive number of proposals per trip.

    k grows by one after a trip that accepted every proposal and shrinks to one more than what was accepted
    after a rejection (at least 1). When proposals keep failing (an exponential average of the accepted
    fraction under `give_up`), the sequence stops proposing for `pause` trips, then tries again with k = 1:
    a request whose text does not repeat pays only for the occasional probe.
    """

    source: DraftSource
    k: int = DEFAULT_DRAFT_TOKENS
    max_k: int = MAX_DRAFT_TOKENS
    give_up: float = 0.2
    pause: int = 16
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    proposed: int = 0  # proposals sent, over the sequence
    accepted: int = 0  # proposals the model agreed with
    _rate: float = 0.6  # exponential average of the accepted fraction
    _paused: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.max_k:
            raise ValueError(f"draft tokens must be in [1, {self.max_k}], got {self.k}")

    async def propose(self, context: list[int], room: int) -> list[int]:
        """Proposals to follow `context`, at most `room` (what the sequence may still generate, minus one)."""
        if self._paused:
            self._paused -= 1
            return []
        k = min(self.k, room)
        return await self.source.propose(self.key, context, k) if k > 0 else []

    def observe(self, proposed: int, accepted: int) -> None:
        """Record a verify trip: `proposed` tokens sent, `accepted` of them agreed with."""
        self.proposed += proposed
        self.accepted += accepted
        self._rate = 0.7 * self._rate + 0.3 * (accepted / proposed)
        if accepted == proposed:
            self.k = min(self.max_k, self.k + 1)
        else:
            self.k = max(1, accepted + 1)
        if self._rate < self.give_up:
            self._paused, self.k, self._rate = self.pause, 1, self.give_up + 0.1

    def close(self) -> None:
        """The sequence is over."""
        self.source.forget(self.key)


def draft_source(which: str, target_tokenizer=None, threads: int | None = None) -> DraftSource:
    """`--speculative ngram` (prompt lookup) or `--speculative MODEL` (a draft model: a path or registry
    name, loaded in its own format and checked against the target's tokenizer)."""
    if which == "ngram":
        return NgramDraft()
    from edgeshard.node.weights.registry import resolve_model
    from edgeshard.node.weights.tokenizer import Tokenizer

    path = resolve_model(which)
    if target_tokenizer is not None:
        check_same_tokenizer(target_tokenizer, Tokenizer.from_checkpoint(path))
    return ModelDraft.load(str(path), threads=threads)
