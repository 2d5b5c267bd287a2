"""The shard executor: sessions, their KV caches and samplers, and one batched step over a stage.

This is the pure core a node runs; the gRPC servicer is a thin layer over it, and `LocalPipeline` chains
executors in one process (the `--local` path and the reference for multi-node tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from edgeshard.node.model.decoder import Segment, Stage
from edgeshard.node.model.kv_cache import GROW_STEP, KVCache
from edgeshard.node.model.sampling import Sampler, SamplingParams


class SessionError(KeyError):
    """A step names a session the node does not hold, or one that already exists."""

    def __str__(self) -> str:  # KeyError quotes its message; say it plainly
        return str(self.args[0])


class StepError(ValueError):
    """A step's inputs do not fit this stage (shape, dtype, positions)."""


@dataclass
class StepRequest:
    """One sequence's rows in a batched step."""

    session_id: str
    start: int  # position of the first row in the sequence
    tokens: torch.Tensor | None = None  # (T,) int64, first stage only
    hidden: torch.Tensor | None = None  # (T, D), other stages
    sample: bool = True  # last stage: sample a token from the last row (False for a non-final prefill chunk)
    # speculative decoding: the last len(draft) rows are these proposed tokens; the last stage checks them
    draft: list[int] | None = None

    @property
    def length(self) -> int:
        """Rows in this request."""
        x = self.tokens if self.tokens is not None else self.hidden
        return 0 if x is None else x.shape[0]


@dataclass
class StepResult:
    """What a stage produced for one sequence: hidden states for the next stage, or a sampled token."""

    session_id: str
    start: int
    hidden: torch.Tensor | None = None  # (T, D) when this is not the last stage
    token: int | None = None  # sampled id when this is the last stage and the request asked for it
    tokens: list[int] | None = None  # a step with a draft: the accepted proposals, then the model's own token


@dataclass
class Session:
    """A sequence this node holds: its cache and, on the last stage, its sampler."""

    cache: KVCache
    sampler: Sampler | None
    reserved: int = 0  # bytes of the node's KV budget this session holds (its max_len's worth)
    # the boundary rows this (non-last) stage sent on, by position: what a replacement of the next stage is
    # fed after a failure (recovery, docs/recovery.md); `kept` rows of it are valid
    sent: torch.Tensor | None = None
    kept: int = 0
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)


class ShardExecutor:
    """Runs a stage for many sessions; validates every step before touching any cache.

    KV memory: with a `kv_budget` (bytes), a session reserves its whole cache when it opens (bytes per
    position x its max_len) and is refused with OverflowError when the budget cannot hold it, so a sequence
    that was admitted never runs out of memory mid-generation; the reservation is returned when it closes.
    """

    def __init__(
        self, stage: Stage, max_sessions: int = 64, max_len: int | None = None, kv_budget: int = 0
    ) -> None:
        self.stage = stage
        self.max_sessions = max_sessions
        self.max_len = max_len or stage.config.max_position_embeddings
        self.kv_budget = kv_budget  # bytes open sessions may reserve; 0: no limit
        self.kv_reserved = 0
        self.sessions: dict[str, Session] = {}
        self.compute_s = 0.0  # time spent in stage forward (for per-stage timing)
        self.steps = 0
        self.recovered_rows = 0  # rows computed by `fill` (refilling caches after a failure)

    @property
    def spec(self):
        """The layer range this executor runs."""
        return self.stage.spec

    @property
    def kv_bytes_per_position(self) -> int:
        """Bytes one position of one sequence takes in this stage's caches (keys and values, every layer)."""
        c = self.stage.config
        itemsize = torch.empty(0, dtype=self.stage.dtype).element_size()
        return len(self.stage.layers) * 2 * c.num_key_value_heads * c.head_dim * itemsize

    @property
    def kept_bytes_per_position(self) -> int:
        """Bytes of the boundary row kept per position of a sequence (0 on the last stage, which sends none).

        The rows are kept as float32 (the residual stream as it goes on the wire): hidden_size x 4 bytes, ~2.3 KB
        for the demo model against 15-45 KB of its KV cache per position on a third of the layers."""
        return 0 if self.stage.spec.is_last else self.stage.config.hidden_size * 4

    @property
    def bytes_per_position(self) -> int:
        """What one position of one session reserves here: its KV caches and its kept boundary row."""
        return self.kv_bytes_per_position + self.kept_bytes_per_position

    def open_session(
        self,
        session_id: str,
        sampling: SamplingParams | None = None,
        replace: bool = True,
        max_len: int | None = None,
    ) -> None:
        """Create (or with replace, recreate) the cache of a session that may reach `max_len` positions
        (None: the context length); OverflowError when the sessions or the KV budget are full."""
        if session_id in self.sessions and not replace:
            raise SessionError(f"session {session_id!r} already exists on this node")
        if session_id not in self.sessions and len(self.sessions) >= self.max_sessions:
            raise OverflowError(
                f"this node holds {self.max_sessions} sessions already; end some or raise --max-sessions"
            )
        max_len = min(max_len or self.max_len, self.max_len)
        need = max_len * self.bytes_per_position  # the kept boundary rows count in the budget too
        old = self.sessions.get(session_id)
        held = self.kv_reserved - (old.reserved if old is not None else 0)
        if self.kv_budget and held + need > self.kv_budget:
            raise OverflowError(
                f"KV memory is full: {len(self.sessions)} sessions reserve {_mib(held)} of this node's "
                f"{_mib(self.kv_budget)} budget and {max_len} more positions need {_mib(need)}; retry when "
                "some finish, ask for fewer tokens, or raise --kv-budget"
            )
        self.close_session(session_id)
        sampler = Sampler(sampling or SamplingParams()) if self.stage.spec.is_last else None
        self.sessions[session_id] = Session(self.stage.new_cache(max_len), sampler, need)
        self.kv_reserved += need

    def close_session(self, session_id: str) -> bool:
        """Free a session's cache and its reservation; returns False when the node did not hold it."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        session.cache.free()
        session.sent, session.kept = None, 0
        self.kv_reserved -= session.reserved
        return True

    def kv_bytes(self) -> int:
        """Bytes held by all KV caches on this node."""
        # a snapshot: GetInfo reads this on the event loop while the compute thread may open sessions
        return sum(s.cache.nbytes() for s in list(self.sessions.values())) + self.kept_bytes()

    def kept_bytes(self) -> int:
        """Bytes of boundary rows kept by all sessions (counted in `kv_bytes` too)."""
        return sum(s.sent.nbytes for s in list(self.sessions.values()) if s.sent is not None)

    def validate(self, req: StepRequest) -> Session:
        """Check a request against this stage and its session; raise StepError/SessionError saying what is wrong."""
        session = self.sessions.get(req.session_id)
        if session is None:
            raise SessionError(
                f"unknown session {req.session_id!r}: open it first (or it was ended / the node restarted)"
            )
        spec, cfg = self.stage.spec, self.stage.config
        if spec.is_first:
            if req.tokens is None or req.tokens.dim() != 1:
                raise StepError(
                    f"stage {spec} takes token ids of shape (T,), got {_describe(req.tokens if req.tokens is not None else req.hidden)}"
                )
            if req.tokens.numel():
                lo, hi = (int(t) for t in torch.aminmax(req.tokens))  # one op, not two: this runs every step
                if lo < 0 or hi >= cfg.vocab_size:
                    raise StepError(f"token ids must be in [0, {cfg.vocab_size}); got {lo}..{hi}")
        else:
            h = req.hidden
            if h is None or h.dim() != 2 or h.shape[1] != cfg.hidden_size:
                raise StepError(
                    f"stage {spec} takes hidden states of shape (T, {cfg.hidden_size}), got {_describe(h if h is not None else req.tokens)}"
                )
            if not h.is_floating_point():
                raise StepError(f"hidden states must be floating point, got {h.dtype}")
        if req.length == 0:
            raise StepError("a step needs at least one row")
        if req.draft:
            if not req.sample or len(req.draft) >= req.length:
                raise StepError(
                    f"a step with {len(req.draft)} proposed tokens needs more rows than that "
                    f"({req.length}) and must sample"
                )
            if spec.is_last and not all(0 <= t < cfg.vocab_size for t in req.draft):
                raise StepError(f"proposed token ids must be in [0, {cfg.vocab_size})")
        if req.start < 0 or req.start > session.cache.offset:
            raise StepError(
                f"session {req.session_id!r}: step starts at position {req.start} but the node holds "
                f"{session.cache.offset} positions (replay from 0 after a restart)"
            )
        if req.start + req.length > session.cache.max_len:
            raise StepError(
                f"session {req.session_id!r}: {req.start + req.length} positions exceed the "
                f"{session.cache.max_len} it was opened for (the context length is {self.max_len})"
            )
        return session

    def step(self, requests: list[StepRequest]) -> list[StepResult]:
        """Run one batched forward over the requests (each a different session)."""
        sessions = [self.validate(r) for r in requests]
        if len({r.session_id for r in requests}) != len(requests):
            raise StepError("a batch holds two steps of the same session")
        segments = [Segment(s.cache, r.start, r.length) for r, s in zip(requests, sessions)]
        rows = [r.tokens if self.stage.spec.is_first else r.hidden for r in requests]
        inputs = rows[0] if len(rows) == 1 else torch.cat(rows)  # one request (a decode step): no copy
        if self.stage.spec.is_first:
            inputs = inputs.long()
        # a step that checks proposals needs the logits of every row, not only each sequence's last
        all_logits = self.stage.spec.is_last and any(r.draft for r in requests)
        t0 = time.perf_counter()
        out = (
            self.stage(inputs, segments, all_logits=all_logits)
            if all_logits
            else self.stage(inputs, segments)
        )
        self.compute_s += time.perf_counter() - t0
        self.steps += 1
        now = time.monotonic()
        results, row = [], 0
        for i, (req, session) in enumerate(zip(requests, sessions)):
            session.last_used = now
            res = StepResult(req.session_id, req.start)
            if self.stage.spec.is_last:
                end = req.start + req.length
                if req.draft:
                    k = len(req.draft)
                    rows = out[
                        row + req.length - k - 1 : row + req.length
                    ]  # after each of the last k+1 tokens
                    res.tokens = session.sampler.verify(rows, req.draft, end - k - 1)
                    res.token = res.tokens[-1]
                elif req.sample:
                    res.token = session.sampler(out[row + req.length - 1] if all_logits else out[i], end)
            else:
                res.hidden = out[row : row + req.length]
                _keep_sent(session, req.start, res.hidden)
            row += req.length
            results.append(res)
        return results

    # ------------------------------------------------------------------------------------------ recovery

    def keep(self, session_id: str, positions: int) -> Session:
        """Adopt a session this stage held under the previous plan for a recovery: it must hold positions
        [0, positions) in its cache and (not the last stage) as kept boundary rows; anything past them (the
        call in flight when the ring failed, which the coordinator retries) is dropped. StepError/SessionError
        when it does not hold them (then the coordinator refills or replays)."""
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionError(f"session {session_id!r} is not held here (ended, or the node restarted)")
        kept = positions if self.stage.spec.is_last else session.kept
        if session.cache.offset < positions or kept < positions:
            raise StepError(
                f"session {session_id!r}: {positions} positions needed, this stage holds "
                f"{session.cache.offset} in its cache and {kept} boundary rows"
            )
        session.cache.trim(session.cache.offset - positions)
        session.kept = min(session.kept, positions)
        session.last_used = time.monotonic()
        return session

    def fill(self, session_id: str, calls: list[StepRequest]) -> int:
        """Compute this stage over `calls` (one session's steps, in order, from position 0) without sampling:
        the refill of a replacement stage after a failure. Each call runs as one step, as it was first fed, so
        the cache (and the boundary rows it keeps) are bit-identical to the uninterrupted run's. Returns the
        rows computed; the session must be open (validate raises on each call that does not fit)."""
        rows = 0
        for call in calls:
            call.sample = False
            call.draft = None
            self.step([call])
            rows += call.length
        self.recovered_rows += rows
        return rows

    def sent_rows(self, session_id: str, end: int) -> torch.Tensor:
        """The boundary rows this stage sent on for positions [0, end) (StepError if it does not keep them)."""
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionError(f"session {session_id!r} is not held here (ended, or the node restarted)")
        if self.stage.spec.is_last or session.sent is None or session.kept < end:
            raise StepError(
                f"session {session_id!r}: {end} boundary rows needed, this stage keeps {session.kept}"
            )
        return session.sent[:end]

    def adopt(self, old: ShardExecutor) -> None:
        """Take over the sessions (caches, kept rows, reservations) of `old`, an executor of the same stage
        replaced by a new plan id: a recovery resumes them (`keep`) instead of recomputing them. Those it
        does not resume are ended by the node (node/service/ring.py, orphaned sessions)."""
        self.sessions.update(old.sessions)
        self.kv_reserved += old.kv_reserved
        self.recovered_rows += old.recovered_rows
        old.sessions, old.kv_reserved = {}, 0


def _keep_sent(session: Session, start: int, hidden: torch.Tensor) -> None:
    """Write the rows a step sends on at [start, start+T) into the session's kept rows (growing them like
    the KV cache grows: in steps, up to its max_len). A step restarting an earlier position (a retry, a
    rejected proposal) overwrites the tail, so the kept rows are always what the next stage last got."""
    end = start + hidden.shape[0]
    buf = session.sent
    if buf is None or buf.shape[0] < end:
        cap = min(session.cache.max_len, -(-end // GROW_STEP) * GROW_STEP)
        new = torch.empty(cap, hidden.shape[1], dtype=torch.float32)
        if buf is not None:
            new[: session.kept] = buf[: session.kept]
        buf = session.sent = new
    buf[start:end] = hidden
    session.kept = end  # as the cache: a step at `start` leaves positions [0, start+T) valid


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _describe(t: torch.Tensor | None) -> str:
    return "nothing" if t is None else f"{tuple(t.shape)} {t.dtype}"


class LocalPipeline:
    """Executors chained in one process: the same step path the nodes run, without the network."""

    def __init__(self, executors: list[ShardExecutor]) -> None:
        self.executors = executors

    def open(self, session_id: str, sampling: SamplingParams, max_len: int = 0) -> None:
        """Open the session on every stage (for up to `max_len` positions; 0: the context length)."""
        for ex in self.executors:
            ex.open_session(session_id, sampling, max_len=max_len or None)

    def close(self, session_id: str) -> None:
        """Free the session on every stage."""
        for ex in self.executors:
            ex.close_session(session_id)

    def step(self, session_id: str, start: int, tokens: list[int], sample: bool = True) -> int | None:
        """Feed tokens at `start` through all stages; the sampled next token (None if not sampled)."""
        return self._run(session_id, start, tokens, sample, None).token

    def verify(self, session_id: str, start: int, tokens: list[int], draft: list[int]) -> list[int]:
        """Feed `tokens` (the last one accepted, then the `draft` proposals) at `start`; the accepted
        proposals and the model's next token (speculative decoding: `Sampler.verify`)."""
        return self._run(session_id, start, [*tokens, *draft], True, list(draft)).tokens

    def _run(self, session_id: str, start: int, tokens: list[int], sample: bool, draft: list[int] | None):
        req = StepRequest(
            session_id, start, tokens=torch.tensor(tokens, dtype=torch.long), sample=sample, draft=draft
        )
        for ex in self.executors:
            (res,) = ex.step([req])
            req = StepRequest(session_id, start, hidden=res.hidden, sample=sample, draft=draft)
        return res
