"""The generation loop the coordinator runs over a pipeline: prefill, then one token (or, with speculative
decoding, several checked at once: speculative.py) per trip.

A pipeline is anything with async `open`, `step` and `close` (the `Pipeline` protocol): `AsyncLocalPipeline`
runs stages in this process, the remote pipeline sends token ids to the first node and receives the sampled
token from the last one. A `Sequence` keeps every token of the request (prompt and generated), so a sequence
can be replayed onto new stages after a failure.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from edgeshard.coordinator.pipeline.speculative import Speculation
from edgeshard.node.model.executor import LocalPipeline
from edgeshard.node.model.sampling import SamplingParams

# Prompt tokens sent in one step; longer prompts go in several. A node batches at most one chunk with the
# decode steps of the other sequences (node/service/batching.py), so the chunk bounds how long a prompt stalls them.
# Engine(prefill_chunk=...) and `serve --prefill-chunk` set it per server.
PREFILL_CHUNK = 128


class Pipeline(Protocol):
    """A chain of stages that turns a sequence's next tokens into its next sampled token.

    `open` gets `max_len`, the positions the sequence may reach (prompt + max_tokens; 0: the context length):
    nodes with a KV budget reserve that much cache for it.
    """

    async def open(self, session_id: str, sampling: SamplingParams, max_len: int = 0) -> None: ...

    async def step(
        self, session_id: str, start: int, tokens: list[int], sample: bool = True
    ) -> int | None: ...

    async def close(self, session_id: str) -> None: ...


class VerifyingPipeline(Pipeline, Protocol):
    """A pipeline that can check proposed tokens in one trip (speculative decoding).

    `verify` feeds `tokens` (the last accepted token) and then the `draft` proposals at `start`, and returns
    the accepted proposals followed by the model's own next token (1 to len(draft)+1 tokens). Positions past
    the accepted ones hold rejected proposals until the next step overwrites them.
    """

    async def verify(self, session_id: str, start: int, tokens: list[int], draft: list[int]) -> list[int]: ...


class AsyncLocalPipeline:
    """`LocalPipeline` behind the async `Pipeline` protocol (it computes inline: no threads, no copies)."""

    def __init__(self, local: LocalPipeline) -> None:
        self.local = local

    async def open(self, session_id: str, sampling: SamplingParams, max_len: int = 0) -> None:
        self.local.open(session_id, sampling, max_len)

    async def step(self, session_id: str, start: int, tokens: list[int], sample: bool = True) -> int | None:
        return self.local.step(session_id, start, tokens, sample)

    async def verify(self, session_id: str, start: int, tokens: list[int], draft: list[int]) -> list[int]:
        return self.local.verify(session_id, start, tokens, draft)

    async def close(self, session_id: str) -> None:
        self.local.close(session_id)


@dataclass
class Sequence:
    """One request's tokens and progress; enough to replay it from scratch."""

    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" when done
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    speculation: Speculation | None = None  # propose tokens and check several per trip (speculative.py)

    @property
    def max_len(self) -> int:
        """Positions this sequence may reach: its KV cache on every stage."""
        return len(self.prompt) + self.max_tokens

    @property
    def draft_proposed(self) -> int:
        """Proposed tokens sent for checking (0 without speculation)."""
        return self.speculation.proposed if self.speculation is not None else 0

    @property
    def draft_accepted(self) -> int:
        """Proposed tokens the model agreed with."""
        return self.speculation.accepted if self.speculation is not None else 0

    @property
    def ttft_s(self) -> float:
        """Seconds from start to the first generated token."""
        return (self.first_token_at or time.perf_counter()) - self.started

    @property
    def decode_tok_per_s(self) -> float:
        """Generated tokens after the first, per second of decoding."""
        if self.first_token_at is None or len(self.generated) < 2:
            return 0.0
        return (len(self.generated) - 1) / ((self.finished_at or time.perf_counter()) - self.first_token_at)


async def generate(
    pipeline: Pipeline, seq: Sequence, prefill_chunk: int = PREFILL_CHUNK
) -> AsyncIterator[int]:
    """Run `seq` to completion on `pipeline`, yielding each generated token id as it is made.

    The prompt goes in chunks of `prefill_chunk` tokens. Stop tokens end the generation and are not yielded.
    The session is closed on every stage at the end, also when the consumer stops early (cancellation, client
    disconnect), so its KV caches are freed at once.
    """
    if not seq.prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
    try:
        # inside the try: a request cancelled while opening still closes whatever stages opened it
        await pipeline.open(seq.session_id, seq.sampling, max_len=seq.max_len)  # the KV it may reserve
        spec = seq.speculation if hasattr(pipeline, "verify") else None
        if spec is None and hasattr(pipeline, "feed"):
            # every next step is just the last token: the last node may feed it to the first one itself,
            # stopping where this loop stops (a stop id; the token at position prompt + max_tokens - 1)
            pipeline.feed(seq.session_id, seq.stop_ids, len(seq.prompt) + seq.max_tokens - 1)
        token = None
        for start in range(0, len(seq.prompt), prefill_chunk):
            chunk = seq.prompt[start : start + prefill_chunk]
            last = start + len(chunk) == len(seq.prompt)
            token = await pipeline.step(seq.session_id, start, chunk, sample=last)
        made = [token]  # tokens the last trip produced (one, or several with speculation)
        while True:
            if seq.first_token_at is None:
                seq.first_token_at = time.perf_counter()
            for token in made:
                if token in seq.stop_ids:
                    seq.finish_reason = "stop"
                    return
                seq.generated.append(token)
                yield token
                if len(seq.generated) >= seq.max_tokens:
                    seq.finish_reason = "length"
                    return
            pos = len(seq.prompt) + len(seq.generated) - 1
            room = seq.max_tokens - len(seq.generated) - 1  # the trip also makes one token of its own
            draft = await spec.propose(seq.prompt + seq.generated, room) if spec is not None else []
            if draft:
                made = await pipeline.verify(seq.session_id, pos, [token], draft)
                spec.observe(len(draft), len(made) - 1)
            else:
                made = [await pipeline.step(seq.session_id, pos, [token])]
    finally:
        seq.finished_at = time.perf_counter()
        if seq.speculation is not None:
            seq.speculation.close()
        await pipeline.close(seq.session_id)
