"""The values of failure recovery: its policy (deadlines), each session's history, and each recovery's record.

`ResilientPipeline` (coordinator/recovery/resilient.py) uses them; `/v1/cluster` and `run --json` report the records.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from edgeshard.coordinator.recovery.liveness import HANG_S, PROBE_TIMEOUT_S
from edgeshard.node.model.sampling import SamplingParams


@dataclass(frozen=True)
class RecoveryPolicy:
    """How long to wait for what, and how often to try (seconds unless named otherwise)."""

    step_deadline_s: float = 2.0  # a step's result is due within this (a decode step takes milliseconds) ...
    row_s: float = 0.02  # ... plus this per token it feeds (a prefill chunk of 512 on a slow board: seconds)
    probe_timeout_s: float = PROBE_TIMEOUT_S  # one Health call (liveness.py)
    hang_s: float = HANG_S  # silence after a missed deadline before a node counts as hung
    max_step_s: float = 120.0  # every node answers, yet no result: the step was lost, rebuild the ring
    wait_s: float = 120.0  # requests arriving during a recovery wait at most this long for it
    attempts: int = 5  # re-place + load + replay rounds per recovery (a node may die during one)
    retry_s: float = 5.0  # while the nodes left cannot hold the model: try again this often
    # while no session is open: look this often for nodes outside the plan worth balancing in (0: never)
    rebalance_s: float = 30.0
    # resume sessions from the caches survivors kept, computing only the lost stages (resume.py); False:
    # always replay the whole history through every stage (the slower path it falls back to)
    resume: bool = True

    def deadline(self, rows: int) -> float:
        """Seconds a call feeding `rows` tokens may take before the nodes are probed."""
        return self.step_deadline_s + rows * self.row_s


@dataclass
class SessionHistory:
    """What a session needs to be rebuilt on new stages: its sampling parameters and every token fed."""

    session_id: str
    sampling: SamplingParams  # with a seed: a replay draws what the first run drew (sampling.py)
    max_len: int = 0  # positions it may reach: the KV cache nodes reserve when it opens (0: the context)
    tokens: list[int] = field(default_factory=list)  # fed so far, by position (prompt, then generated)
    # where each call started: a replay repeats the calls (prefill chunks, then one token per decode step),
    # because the same rows in other shapes (one long chunk) compute the KV cache in a different order, and
    # those last bits can turn a near-tie into another token
    starts: list[int] = field(default_factory=list)
    pending: int | None = None  # start of the call in flight: retried after a recovery, so not replayed
    epoch: int = 0  # the plan id the session is open under (0: none yet)
    predicted: tuple[int, int] | None = None  # (position, token) of the last sampled result

    def feed(self, start: int, tokens: list[int]) -> None:
        """Record a call feeding `tokens` at `start` (a step may restart an earlier position)."""
        if start > len(self.tokens):
            raise ValueError(
                f"session {self.session_id!r}: a step at {start} leaves a gap after {len(self.tokens)} "
                "positions; feed every position in order"
            )
        del self.tokens[start:]
        self.tokens.extend(tokens)
        while self.starts and self.starts[-1] >= start:
            self.starts.pop()
        self.starts.append(start)
        self.pending = start

    def replay_tokens(self) -> list[int]:
        """The tokens to feed new stages: everything fed before the call in flight (which is retried)."""
        return self.tokens[: self.pending] if self.pending is not None else list(self.tokens)

    def replay_calls(self) -> list[tuple[int, list[int]]]:
        """`replay_tokens` as the calls that fed them: (start, tokens) each."""
        end = len(self.replay_tokens())
        starts = [s for s in self.starts if s < end]
        return [(s, self.tokens[s:e]) for s, e in zip(starts, [*starts[1:], end])]


@dataclass
class RecoveryEvent:
    """One recovery: what failed, what was done, and how long each part took (milliseconds)."""

    detected_at: float  # wall clock (Unix seconds) when the call that failed began
    cause: str  # what showed it, and what the probes found
    nodes: list[str]  # the failed nodes, "name (address)"
    probe_ms: float = 0.0  # from the start of the call that failed to knowing which nodes failed
    replan_ms: float = 0.0  # probing candidates and placing the layers
    load_ms: float = 0.0  # LoadShard on every node of the new plan (survivors only take the new plan id)
    replay_ms: float = 0.0  # rebuilding the KV caches of every session in flight
    # from the start of the call that failed (the client has waited since: the deadline of a hang included)
    # to serving again, and to that call's result on the new plan (the next token: what a user waited)
    pause_ms: float = 0.0
    resumed_ms: float = 0.0
    attempts: int = 0  # rounds of place + load + replay it took
    sessions: int = 0  # sessions replayed
    replayed_tokens: int = 0  # of the sessions replayed through every stage (not resumed)
    resumed: int = 0  # sessions resumed from kept caches: only the lost stages computed (resume.py)
    refilled_rows: int = 0  # rows those lost stages computed (positions x stages filled)
    refill_compute_ms: float = 0.0  # of replay_ms: the filled nodes computing them (summed over sessions)
    kept_stages: list[int] = field(default_factory=list)  # stages (by index) that kept their caches
    action: str = ""  # what the new plan is: "replaced node2 by node4", "re-split ... over 2 node(s)"
    plan_id: int = 0  # the new epoch
    plan: list[dict] = field(default_factory=list)  # the new plan, as `run --json` prints plans
    outcome: str = "recovering"  # recovered, capacity (the nodes left cannot hold the model) or failed
    error: str = ""  # why it did not recover
    started: float = field(default_factory=time.perf_counter, repr=False)
    origin: float = field(default=0.0, repr=False)  # perf_counter when the call that failed began

    def to_dict(self) -> dict:
        """JSON-friendly, times rounded (for `/v1/cluster` and `run --json`)."""
        d = asdict(self)
        del d["started"], d["origin"]
        for k, v in d.items():
            if k.endswith("_ms"):
                d[k] = round(v, 1)
        d["detected_at"] = round(self.detected_at, 3)
        return d

    def summary(self) -> str:
        """The one line a user reads in the log."""
        head = f"{', '.join(self.nodes)} failed ({self.cause})" if self.nodes else self.cause
        if self.outcome != "recovered":
            return f"{head}; could not recover after {self.pause_ms / 1e3:.1f} s: {self.error}"
        replayed = self.sessions - self.resumed
        seqs = f"replay {replayed} sequence{'s' if replayed != 1 else ''} ({self.replayed_tokens} tokens)"
        if self.resumed:  # only the lost stages computed: say which kept their caches
            resumed = (
                f"resume {self.resumed} sequence{'s' if self.resumed != 1 else ''} (stages "
                f"{', '.join(map(str, self.kept_stages))} kept their caches, {self.refilled_rows} rows recomputed)"
            )
            seqs = resumed if not replayed else f"{resumed}, {seqs}"
        tries = f" in {self.attempts} attempts" if self.attempts > 1 else ""
        return (
            f"{head}; recovered in {self.pause_ms / 1e3:.1f} s{tries}: {self.action} "
            f"(detect {self.probe_ms:.0f} ms, re-plan {self.replan_ms:.0f} ms, load {self.load_ms:.0f} ms, "
            f"{seqs} {self.replay_ms:.0f} ms); now serving plan {self.plan_id} on "
            + ", ".join(f"{s['node']} {s['start_layer']}-{s['end_layer'] - 1}" for s in self.plan)
        )
