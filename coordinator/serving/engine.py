"""The coordinator's serving core: requests in, text pieces out, over one `Pipeline` (local or remote).

    engine = Engine(pipeline, tokenizer, "smollm2-135m", context_length=8192)
    generation = engine.submit(GenerationRequest(messages=[{"role": "user", "content": "Hi"}]))
    async for event in generation:         # TextDelta(...), ..., Finished(finish_reason, usage)
        ...

`submit` does everything that can refuse a request before any work starts (model name, tokenizing, context
length, admission), so the HTTP layer can still answer with a status code. Each admitted request runs as its
own task that owns one `Sequence` and drives `generate()` on the shared pipeline; several tasks interleave on
the pipeline, and the nodes batch their concurrent steps (continuous batching, node/service/batching.py). The consumer reads events from a queue; when it goes away (client
disconnect, cancellation) the task is cancelled once, and `generate()`'s finally closes the session on every
stage. A plain asyncio task is used on purpose: anyio cancel scopes (Starlette's) re-cancel every await, which
would cut that close short.

Admission (coordinator/serving/admission.py): at most `max_running` sequences on the pipeline, and with
`kv_capacity` (KV positions the nodes' budgets hold) at most that many positions reserved (prompt +
max_tokens each); `max_queued` more wait in arrival order; beyond that `ClusterBusyError` (HTTP 429).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeshard.coordinator.errors import (
    BadRequestError,
    ClusterBusyError,
    ContextLengthError,
    EdgeshardError,
    ModelNotFoundError,
    ServerUnavailableError,
)
from edgeshard.coordinator.pipeline.generate import PREFILL_CHUNK, Pipeline, generate
from edgeshard.coordinator.pipeline.generate import Sequence as TokenSequence
from edgeshard.coordinator.pipeline.speculative import Speculation
from edgeshard.coordinator.serving.admission import Admission
from edgeshard.coordinator.serving.metrics import ServingMetrics, TokenClock
from edgeshard.coordinator.serving.text import StopMatcher, render_prompt
from edgeshard.node.model.sampling import SamplingParams


@dataclass
class GenerationRequest:
    """One completion (`prompt`) or chat (`messages`) request, already validated for types."""

    prompt: str | list[int] | None = None  # text, or token ids (completions)
    messages: list[Mapping[str, Any]] | None = None  # chat messages (role, content)
    model: str | None = None  # None: the served model
    max_tokens: int | None = None  # None: what is left of the context
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()  # strings that end the text (not included in it)
    ignore_eos: bool = False  # generate max_tokens tokens: the model's end tokens do not stop it (benchmarks)


@dataclass
class Usage:
    """Token counts of one request, as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int
    draft_proposed: int = 0  # speculative decoding: proposed tokens checked (0: none)
    draft_accepted: int = 0  # of those, the ones the model agreed with

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        """The `usage` object of a response; with speculation, OpenAI's `completion_tokens_details` says how
        many proposed tokens were accepted and rejected (the fields of its predicted outputs)."""
        out: dict = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.draft_proposed:
            out["completion_tokens_details"] = {
                "accepted_prediction_tokens": self.draft_accepted,
                "rejected_prediction_tokens": self.draft_proposed - self.draft_accepted,
            }
        return out


@dataclass
class TextDelta:
    """New text of a generation."""

    text: str


@dataclass
class Finished:
    """The last event of a generation."""

    finish_reason: str  # "stop" (end token or stop string) or "length"
    usage: Usage


@dataclass
class Completion:
    """A whole generation, collected."""

    text: str
    finish_reason: str
    usage: Usage


class Generation:
    """An admitted request: iterate it for `TextDelta`s and one final `Finished` (errors are raised)."""

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def __aiter__(self) -> AsyncIterator[TextDelta | Finished]:
        try:
            while True:
                event = await self.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.cancel()  # synchronous on purpose: safe inside any cancel scope

    async def collect(self) -> Completion:
        """Run to the end; the whole text."""
        pieces: list[str] = []
        async for event in self:
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                return Completion("".join(pieces), event.finish_reason, event.usage)
        raise EdgeshardError("the generation ended without a result")

    def cancel(self) -> None:
        """Stop generating (frees the sequence on every stage); no-op once finished or cancelled."""
        # once only: a second cancel would interrupt the session close that the first one started
        if self.task is not None and not self.task.done() and not self.task.cancelling():
            self.task.cancel()


class Engine:
    """Serves one model over one pipeline: admission, tokenizing, stop strings, usage."""

    def __init__(
        self,
        pipeline: Pipeline | None,
        tokenizer: Any,
        model_name: str,
        context_length: int,
        *,
        aliases: Sequence[str] = (),
        max_running: int = 8,
        max_queued: int = 32,
        info: Callable[[], Awaitable[dict]] | None = None,
        unavailable_reason: str = "no plan can run: the cluster has no pipeline",
        kv_capacity: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        speculation: Callable[[], Speculation] | None = None,
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"max_running must be >= 1 and max_queued >= 0, got {max_running}, {max_queued}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.aliases = frozenset({model_name, *aliases})
        self.context_length = context_length
        self.admission = Admission(max_running, kv_capacity)  # running slots and KV positions
        self.max_queued = max_queued
        self.prefill_chunk = prefill_chunk  # prompt tokens per step (see generate.PREFILL_CHUNK)
        self.info = info  # plan, nodes and per-stage timings, from whoever built the pipeline
        self.unavailable_reason = unavailable_reason
        self.created = int(time.time())
        self.requests = 0  # admitted since start
        self.tokens = 0  # generated since start
        self.metrics = ServingMetrics()  # Prometheus counters and latency histograms (GET /metrics)
        self.speculation = speculation  # makes each request's Speculation (None: one token per trip)
        self.draft_proposed = 0  # speculative decoding since start: tokens proposed, and accepted
        self.draft_accepted = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def max_running(self) -> int:
        """Sequences generating at once at most (admission reads it on every submit)."""
        return self.admission.max_running

    @max_running.setter
    def max_running(self, value: int) -> None:
        self.admission.max_running = value

    @property
    def running(self) -> int:
        """Sequences on the pipeline now."""
        return self.admission.running

    @property
    def waiting(self) -> int:
        """Admitted, waiting for a running slot or KV memory."""
        return self.admission.waiting

    def attach(
        self,
        pipeline: Pipeline,
        info: Callable[[], Awaitable[dict]] | None = None,
        kv_capacity: int | None = None,
    ) -> None:
        """Serve over `pipeline` from now on (a plan became runnable), whose nodes hold `kv_capacity` KV
        positions. Requests already running keep theirs: the seam where replanning and recovery swap
        pipelines."""
        self.pipeline, self.info = pipeline, info
        self.admission.kv_capacity = kv_capacity

    # ---- refusing early -------------------------------------------------------------------------------------
    def check_available(self) -> None:
        """Raise ServerUnavailableError when no pipeline can run (none set, or it broke)."""
        broken = getattr(self.pipeline, "broken", None)  # RemotePipeline records what broke it
        if self.pipeline is None or broken is not None:
            raise ServerUnavailableError(
                f"{self.unavailable_reason}: {broken}" if broken else self.unavailable_reason,
                code=getattr(broken, "code", None),  # a ring short of memory: insufficient_memory (503)
            )

    def check_model(self, model: str | None) -> None:
        """Raise ModelNotFoundError unless `model` is None or a name of the served model."""
        if model is not None and model not in self.aliases:
            raise ModelNotFoundError(
                f"the model {model!r} is not served here; this server serves "
                f"{self.model_name!r} (see GET /v1/models)",
                param="model",
            )

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The prompt's token ids (chat messages through the model's chat template)."""
        ids = render_prompt(self.tokenizer, req.prompt, req.messages)
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise BadRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if not ids:
            raise BadRequestError("the prompt is empty: give some text", param="prompt")
        return ids

    def token_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """Tokens this request may generate; ContextLengthError when it cannot fit the context (or the KV
        memory of the whole cluster: then no wait would help)."""
        limit, what = self.context_length, f"this model's maximum context length is {self.context_length}"
        kv = self.admission.kv_capacity
        if kv is not None and kv < limit:
            limit, what = kv, f"the cluster's KV memory (the nodes' --kv-budget) holds {kv}"
        room = limit - prompt_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" and {max_tokens} in the completion" if max_tokens is not None else ""
            raise ContextLengthError(
                f"{what} tokens, but the request has {prompt_tokens} tokens in the prompt{asked}; "
                "shorten the prompt or lower max_tokens",
                param="messages" if max_tokens is None else "max_tokens",
            )
        return room if max_tokens is None else max_tokens

    # ---- serving --------------------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> Generation:
        """Admit a request and start it; raises a typed EdgeshardError when it cannot run."""
        clock = TokenClock()
        try:
            return self._submit(req, clock)
        except EdgeshardError as e:
            self.metrics.refused.labels(status=str(e.status)).inc()
            raise

    def _submit(self, req: GenerationRequest, clock: TokenClock) -> Generation:
        self.check_model(req.model)
        self.check_available()
        try:
            sampling = SamplingParams(
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed
            )
        except ValueError as e:
            raise BadRequestError(str(e)) from None
        ids = self.prompt_ids(req)
        budget = self.token_budget(len(ids), req.max_tokens)
        stop_ids = frozenset() if req.ignore_eos else frozenset(self.tokenizer.stop_token_ids)
        seq = TokenSequence(ids, sampling, budget, stop_ids)
        if self.speculation is not None:
            seq.speculation = self.speculation()
        adm = self.admission
        if not adm.can_start(seq.max_len) and adm.waiting >= self.max_queued:
            kv = f", {adm.reserved} of {adm.kv_capacity} KV positions reserved" if adm.kv_capacity else ""
            raise ClusterBusyError(
                f"the cluster is busy: {adm.running} requests running{kv} and {adm.waiting} queued "
                f"(--max-queued {self.max_queued}); retry in a moment"
            )
        gen = Generation(seq.session_id, len(ids))
        self.requests += 1
        self.metrics.requests.inc()
        self.metrics.prompt_tokens.inc(len(ids))
        ticket = adm.enter(seq.max_len)  # running now, or queued in arrival order
        gen.task = asyncio.get_running_loop().create_task(
            self._run(gen, seq, StopMatcher(req.stop), ticket, clock)
        )
        self._tasks.add(gen.task)
        gen.task.add_done_callback(self._tasks.discard)
        return gen

    async def complete(self, req: GenerationRequest) -> Completion:
        """Submit and collect: the whole text, finish reason and usage."""
        return await self.submit(req).collect()

    async def _run(
        self, gen: Generation, seq: TokenSequence, stop: StopMatcher, ticket, clock: TokenClock
    ) -> None:
        try:
            await ticket.granted
            await self._generate(gen, seq, stop, clock)
        except asyncio.CancelledError:
            raise
        except EdgeshardError as e:
            gen.events.put_nowait(e)
        except Exception as e:  # the pipeline failed: tell the consumer in our terms
            gen.events.put_nowait(pipeline_error(e))
        finally:
            # after generate() closed the session: the nodes free its cache before a later Open reserves
            self.admission.leave(ticket)

    async def _generate(
        self, gen: Generation, seq: TokenSequence, stop: StopMatcher, clock: TokenClock
    ) -> None:
        self.check_available()  # it may have broken while this request waited
        decoder = self.tokenizer.decode_stream(skip_special_tokens=True)
        tokens = generate(self.pipeline, seq, self.prefill_chunk)
        try:
            async for token in tokens:
                self.tokens += 1
                self.metrics.token(clock)
                text, hit = stop.feed(decoder.step(token))
                if text:
                    gen.events.put_nowait(TextDelta(text))
                if hit:
                    seq.finish_reason = "stop"
                    break
                await asyncio.sleep(0)  # an inline (local) pipeline never yields: let other requests run
            else:  # ended by an end token or the length: emit what the decoder and the matcher held back
                text, hit = stop.feed(decoder.flush())
                text += "" if hit else stop.flush()
                if hit:
                    seq.finish_reason = "stop"
                if text:
                    gen.events.put_nowait(TextDelta(text))
        finally:
            await tokens.aclose()  # closes the session on every stage, also on break and cancellation
        self.draft_proposed += seq.draft_proposed
        self.draft_accepted += seq.draft_accepted
        usage = Usage(len(seq.prompt), len(seq.generated), seq.draft_proposed, seq.draft_accepted)
        gen.events.put_nowait(Finished(seq.finish_reason or "stop", usage))

    def stats(self) -> dict[str, int]:
        """Admission counters."""
        return {
            "running": self.running,
            "queued": self.waiting,
            "max_running": self.max_running,
            "max_queued": self.max_queued,
            "kv_capacity": self.admission.kv_capacity or 0,  # positions (0: no KV limit)
            "kv_reserved": self.admission.reserved,
            "requests": self.requests,
            "generated_tokens": self.tokens,
            "draft_proposed_tokens": self.draft_proposed,  # speculative decoding (0 when off)
            "draft_accepted_tokens": self.draft_accepted,
        }

    async def cluster_info(self) -> dict[str, Any]:
        """Model, admission counters, and what the pipeline's builder reports (plan, nodes, stage timings)."""
        out: dict[str, Any] = {
            "model": self.model_name,
            "context_length": self.context_length,
            "engine": self.stats(),
        }
        if self.info is not None:
            out.update(await self.info())
        return out

    async def aclose(self) -> None:
        """Cancel every running request and wait until their sessions are closed."""
        tasks = list(self._tasks)
        for t in tasks:
            if not t.cancelling():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def pipeline_error(e: Exception) -> EdgeshardError:
    """A pipeline failure as a serving error: full nodes are busy (429), anything else means no plan (503)."""
    if isinstance(e, OverflowError) or "RESOURCE_EXHAUSTED" in str(e):
        return ClusterBusyError(f"a node holds as many sequences as it can: {e}")
    return ServerUnavailableError(f"the cluster failed while generating: {e}")
