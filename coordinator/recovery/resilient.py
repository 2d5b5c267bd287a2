"""`ResilientPipeline`: the `Pipeline` protocol over a ring of nodes that survives nodes dying mid-generation.

    pipe = ResilientPipeline(deployment, await deployment.pipeline(), replanner, model_ref="smollm2-135m")
    async for token in generate(pipe, seq): ...   # a node dies: a pause and one log line, the same tokens

On top of `RemotePipeline` (coordinator/pipeline/remote.py) it keeps, per session, the sampling parameters (an
unseeded sampler gets its seed here, so a replay draws what the first run drew) and every token fed
(`SessionHistory`), and runs every call under a deadline:

- failure: a call's error, or its deadline passing, makes it probe the plan's nodes (coordinator/recovery/watchdog.py).
  A node that is down or restarted is a failure at once, a silent one after `hang_s`; broken streams are
  failures too. An error a node gave for the request itself (bad input, KV memory full) is the caller's.
- recovery, once per failed plan however many sessions notice: re-place (coordinator/recovery/replan.py), load with a
  new plan id (the epoch that fences off the old plan's messages; survivors keep their weights), replay every
  session (open, then its history call by call, as it was fed), and let the failed calls retry. Calls
  arriving meanwhile wait (at most `wait_s`).
- capacity: when the nodes left cannot hold the model, the calls fail with `CapacityError` (what is left,
  what is missing, what to add) and `broken` says so (the engine answers 503); the placement is retried every
  `retry_s` and serving resumes once enough nodes are back.

- re-balance: while no session is open, every `rebalance_s` it looks for live nodes outside the plan (ones
  that came back after a failure, new ones) and moves to the placement over all of them when the cost model
  predicts it faster (replan.py `Replanner.better`). Only between requests: a sequence in flight would
  need a replay, which costs more than a faster ring saves in one request.

Every recovery (and re-balance) is a `RecoveryEvent`, logged as one line and kept in `events` (`recoveries`:
as dicts).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from rich.console import Console

from edgeshard.coordinator.errors import CapacityError, ClusterError
from edgeshard.coordinator.recovery.liveness import NodeFailure, probe_all
from edgeshard.coordinator.recovery.log import RecoveryEvent, RecoveryPolicy, SessionHistory
from edgeshard.coordinator.recovery.replan import Placement, Replanner
from edgeshard.coordinator.recovery.resume import Resumed, resume
from edgeshard.coordinator.recovery.watchdog import Watchdog
from edgeshard.node.model.sampling import SamplingParams

log = logging.getLogger("edgeshard.coordinator")


class ResilientPipeline:
    """Runs sessions on a deployed ring and rebuilds the ring when nodes fail (see the module docstring)."""

    def __init__(
        self,
        deployment,
        pipeline,
        replanner: Replanner,
        *,
        model_ref: str,
        quant: str | None = None,
        plan=None,
        policy: RecoveryPolicy | None = None,
    ) -> None:
        self.deployment = deployment  # remote_run.Deployment of the current plan
        self.pipeline = pipeline  # its started RemotePipeline
        self.plan = plan  # the planner's Plan of it (None: the initial --peers split)
        self.replanner, self.model_ref, self.quant = replanner, model_ref, quant
        self.num_layers = replanner.cost.num_layers
        self.policy = policy or RecoveryPolicy()
        # every call runs under its deadline; probes judge failures (coordinator/recovery/watchdog.py)
        self.watchdog = Watchdog(
            self.policy, lambda: ({e["address"]: e["node"] for e in self.deployment.plan}, self.epoch)
        )
        self.sessions: dict[str, SessionHistory] = {}
        self.events: list[RecoveryEvent] = []
        self.recoveries: list[dict] = []  # the events as dicts, as they end (run --json holds this list)
        self.state = "serving"  # serving, recovering, down
        self.broken: ClusterError | None = None  # set while down (Engine.check_available reads it)
        self._ready = asyncio.Event()
        self._ready.set()
        self._lock = asyncio.Lock()
        self._failed = asyncio.Event()  # set when the current plan is given up: its calls stop waiting
        self._owned: list = []  # deployments made here (closed by aclose)
        self._tasks: set[asyncio.Task] = set()
        self._recovery: asyncio.Task | None = None
        # called with the new deployment after each recovery (the engine's KV admission follows the nodes)
        self.on_new_plan: list[Callable[[object], None]] = []
        self._retry: asyncio.Task | None = None
        self._rebalancer: asyncio.Task | None = None  # started with the first session (needs a running loop)
        self._retiring = None  # the failed plan's pipeline, closed once the new plan is installed

    @property
    def epoch(self) -> int:
        """The plan id every message carries now."""
        return self.deployment.plan_id

    # ------------------------------------------------------------------------------------------ Pipeline

    async def open(self, session_id: str, sampling: SamplingParams, max_len: int = 0) -> None:
        """Open the session on every node for up to `max_len` positions (waiting out a recovery)."""
        if self._rebalancer is None and self.policy.rebalance_s > 0:
            self._rebalancer = asyncio.ensure_future(self._rebalance_loop())
        if not sampling.greedy and sampling.seed is None:  # fix the seed: a replay must draw the same tokens
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(62))
        session = self.sessions[session_id] = SessionHistory(session_id, sampling, max_len)
        await self._call(session, None, 0)  # opening is replaying an empty history

    async def step(self, session_id: str, start: int, tokens: list[int], sample: bool = True) -> int | None:
        """Feed `tokens` at `start`; the sampled next token (None for sample=False). Survives node failures."""
        session = self.sessions.get(session_id)
        if session is None:
            raise ClusterError(f"session {session_id!r} is not open here; open it first")
        session.feed(start, tokens)
        try:
            token = await self._call(
                session, lambda pipe: pipe.step(session_id, start, tokens, sample), len(tokens)
            )
        finally:
            session.pending = None
        if token is not None:
            session.predicted = (start + len(tokens), token)
        return token

    def feed(self, session_id: str, stop_ids, until: int) -> bool:
        """The direct token feed (`RemotePipeline.feed`) for `session_id` on the current plan. After a failure
        the replayed session runs unfed on the new plan: the coordinator sends its steps again."""
        session = self.sessions.get(session_id)
        if session is None or self.state != "serving" or session.epoch != self.epoch:
            return False
        return self.pipeline.feed(session_id, stop_ids, until)

    async def verify(self, session_id: str, start: int, tokens: list[int], draft: list[int]) -> list[int]:
        """`RemotePipeline.verify`, surviving node failures as `step` does. The history keeps the proposals as
        fed (a replay repeats the same calls, so rebuilt caches are bit-identical); the next step overwrites
        the rejected ones."""
        session = self.sessions.get(session_id)
        if session is None:
            raise ClusterError(f"session {session_id!r} is not open here; open it first")
        fed = [*tokens, *draft]
        session.feed(start, fed)
        try:
            accepted = await self._call(
                session, lambda pipe: pipe.verify(session_id, start, tokens, draft), len(fed)
            )
        finally:
            session.pending = None
        session.predicted = None  # the last row fed is a proposal: nothing to compare a replay with
        return accepted

    async def close(self, session_id: str) -> None:
        """End the session on every node (nothing to do on nodes that failed or were reloaded)."""
        session = self.sessions.pop(session_id, None)
        if session is not None and session.epoch == self.epoch and self._ready.is_set() and not self.broken:
            with contextlib.suppress(ClusterError):
                await self.pipeline.close(session_id)

    async def aclose(self) -> None:
        """Stop retrying, close the pipeline and the deployments made here (the first is its owner's)."""
        for task in (self._retry, self._recovery, self._rebalancer):
            if task is not None:
                task.cancel()
        self._retire(self.pipeline)
        for deployment in self._owned:
            self._tasks.add(asyncio.ensure_future(deployment.close()))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def status(self) -> dict:
        """State, the liveness of every node seen (probed now: one marked down shows up again once it
        answers), and every recovery so far (`/v1/cluster`)."""
        known = [*(e["address"] for e in self.deployment.plan), *self.watchdog.nodes]
        self.watchdog.note(await probe_all(list(dict.fromkeys(known)), None, self.policy.probe_timeout_s))
        return {
            "state": self.state,
            "plan_id": self.epoch,
            "error": str(self.broken) if self.broken else None,
            "nodes": self.watchdog.nodes,
            "recoveries": self.recoveries,
            "policy": dataclasses.asdict(self.policy),
        }

    # ------------------------------------------------------------------------------------------ calls

    async def _call(self, session: SessionHistory, make: Callable | None, rows: int):
        """`make(pipeline)` for `session` on the current plan, rebuilding the ring and retrying on failures."""
        failed: NodeFailure | None = None
        for _ in range(self.policy.attempts + 1):
            pipe, epoch = await self._current()
            try:
                if session.epoch != epoch:  # not open on this plan yet (or missed the replay)
                    await self._replay(session, pipe, epoch)
                result = None if make is None else await self._guard(make(pipe), rows)
                if failed is not None:
                    self._resumed(failed)
                return result
            except NodeFailure as failure:
                failed = failed or failure
                await self._recover(epoch, failure)
        raise ClusterError(
            f"session {session.session_id}: the ring failed {self.policy.attempts + 1} times in a row; "
            "check the nodes' logs"
        )

    def _guard(self, call: Awaitable, rows: int) -> Awaitable:
        """`call` under the watchdog: NodeFailure when nodes failed, the caller's own errors as they are."""
        return self.watchdog.guard(call, rows, self._failed)

    async def _current(self):
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.policy.wait_s)
            except asyncio.TimeoutError:
                raise ClusterError(
                    f"the cluster has been recovering from a node failure for over {self.policy.wait_s:g} s; "
                    "retry later"
                ) from None
        if self.broken is not None:
            raise self.broken
        return self.pipeline, self.epoch

    # ------------------------------------------------------------------------------------------ recovery

    async def _recover(self, epoch: int, failure: NodeFailure) -> None:
        """Rebuild the ring once per failed plan and wait for it; CapacityError when nothing fits.

        The rebuild is a task of its own, shielded: the request that noticed the failure may be cancelled
        (its client went away) without cutting short a recovery that every session waits for.
        """
        if self._recovery is None or self._recovery.done():
            if self.broken is not None:
                raise self.broken
            if self.epoch != epoch:
                return  # another caller recovered already
            self._ready.clear()  # from now on, calls wait for the new plan
            self._failed.set()  # and calls waiting on the old one give up
            self._recovery = asyncio.ensure_future(self._run_recovery(failure))
        await asyncio.shield(self._recovery)

    async def _run_recovery(self, failure: NodeFailure) -> None:
        async with self._lock:
            self.state = "recovering"
            # the old pipeline's streams stay open until the new plan is installed: a node ends the sessions of
            # a coordinator's stream that closes, and survivors keep theirs for `resume` (see _rebuild)
            self._retiring = self.pipeline
            event = RecoveryEvent(failure.detected_at, failure.cause, failure.nodes, failure.probe_ms)
            event.origin = failure.t0
            try:
                try:
                    await self._rebuild(event)
                except (ClusterError, asyncio.CancelledError):
                    raise
                except Exception as e:  # a bug: fail like a recovery that could not finish, keep the log
                    log.exception("recovery failed")
                    raise ClusterError(f"{type(e).__name__}: {e}") from e
            except ClusterError as e:  # capacity, or the ring kept failing: down until a retry succeeds
                event.outcome = "capacity" if isinstance(e, CapacityError) else "failed"
                event.error = str(e)
                self.broken = e if isinstance(e, CapacityError) else ClusterError(f"recovery failed: {e}")
                self.state = "down"
                self._retry = asyncio.ensure_future(self._retry_loop())
                raise self.broken from None
            finally:
                if self._retiring is not None:  # no new plan: end the sessions, close the streams
                    self._retire(self._retiring)
                    self._retiring = None
                event.pause_ms = (time.perf_counter() - failure.t0) * 1e3
                self._record(event)
                self._ready.set()

    async def _rebuild(self, event: RecoveryEvent, first: Placement | None = None) -> None:
        """Place (the first round: `first`, when given), load and replay until the ring runs (or `attempts`
        rounds failed); raises ClusterError."""
        from edgeshard.coordinator.pipeline.deploy import deploy

        why: Exception | None = None
        for attempt in range(1, self.policy.attempts + 1):
            event.attempts = attempt
            t = time.perf_counter()
            try:
                if attempt == 1 and first is not None:
                    placement = first
                else:  # CapacityError: nothing fits
                    placement = await self.replanner.place(self.deployment.plan)
            finally:
                event.replan_ms += (time.perf_counter() - t) * 1e3
                self.watchdog.note(self.replanner.probes)
            plan = placement.plan
            t = time.perf_counter()
            try:
                load = deploy(
                    plan.addresses(), self.model_ref, self.num_layers, self.quant, _QUIET, specs=plan.specs()
                )
                deployment = await self.watchdog.watch(load, plan.addresses())
                try:
                    pipe = await deployment.pipeline()
                except BaseException:
                    self._tasks.add(asyncio.ensure_future(deployment.close()))
                    raise
            except ClusterError as e:  # a node died (or hung) while loading: place again without it
                event.load_ms += (time.perf_counter() - t) * 1e3
                why = e
                continue
            event.load_ms += (time.perf_counter() - t) * 1e3
            if self._retiring is not None:  # the nodes run the new plan now: its sessions stay on them
                self._retire(self._retiring, end_sessions=False)
                self._retiring = None
            old = self.deployment
            old_plan = old.plan
            self._owned.append(deployment)
            self.deployment, self.pipeline, self.plan = deployment, pipe, plan
            self._failed = asyncio.Event()
            if old in self._owned:  # the calls on it are over; its channels can go
                self._owned.remove(old)
                self._tasks.add(asyncio.ensure_future(old.close()))
            t = time.perf_counter()
            try:
                await self._replay_all(event, old_plan)
            except NodeFailure as f:  # a node failed during the replay: give this plan up too
                event.replay_ms += (time.perf_counter() - t) * 1e3
                self._failed.set()
                self._retire(pipe)
                why = f
                continue
            event.replay_ms += (time.perf_counter() - t) * 1e3
            event.action, event.plan_id, event.plan = placement.action, self.epoch, deployment.plan
            event.outcome = "recovered"
            self.state = "serving"
            for listener in self.on_new_plan:
                listener(deployment)
            return
        raise ClusterError(f"the ring kept failing ({self.policy.attempts} attempts); last: {why}")

    async def _replay_all(self, event: RecoveryEvent, old_plan: list[dict] | None = None) -> None:
        """Rebuild every session on the new plan at once: resumed from the caches the nodes kept where it
        can be (`resume`: only the lost stages compute), else replayed; NodeFailure when the ring fails again."""
        sessions = list(self.sessions.values())
        in_flight = [s for s in sessions if s.epoch]  # the others arrived meanwhile: only opened here
        replay = list(sessions)
        if old_plan and self.policy.resume:
            # one after the other: a replacement fills one session at a time anyway (its compute thread), and
            # each resume's deadline then counts its own rows, not the queue of the others before it
            resumed = [await self._resume(s, old_plan) for s in in_flight]
            done = {s.session_id for s, r in zip(in_flight, resumed) if r is not None}
            replay = [s for s in sessions if s.session_id not in done]
            event.resumed = len(done)
            event.refilled_rows = sum(r.rows for r in resumed if r is not None)
            event.refill_compute_ms = sum(r.compute_ms for r in resumed if r is not None)
            event.kept_stages = sorted({i for r in resumed if r is not None for i in r.kept})
        outcomes = await asyncio.gather(
            *(self._replay(s, self.pipeline, self.epoch) for s in replay), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, NodeFailure):
                raise outcome
            # another error is the session's own: its call meets it again when it retries
        event.sessions = len(in_flight)
        event.replayed_tokens = sum(len(s.replay_tokens()) for s in in_flight if s in replay)
        for s in sessions:  # ended while being replayed: free it again
            if s.session_id not in self.sessions:
                with contextlib.suppress(ClusterError):
                    await self.pipeline.close(s.session_id)

    async def _resume(self, session: SessionHistory, old_plan: list[dict]) -> Resumed | None:
        """`resume` the session on the current plan (None: it must be replayed); marks it open there."""
        epoch = self.epoch
        call = resume(
            session, old_plan, self.deployment.plan, self.deployment.clients, epoch, self.pipeline.subscriber
        )
        try:  # under the deadline of its rows, as a replay: a node hanging in a fill is a failure of the plan
            resumed = await self._guard(call, len(session.replay_tokens()))
        except NodeFailure:
            raise
        except Exception:  # a bug here must cost a replay, not the recovery
            log.exception("session %s: resuming failed; replaying it", session.session_id)
            return None
        if resumed is not None:
            session.epoch = epoch
            log.info(
                "session %s resumed: stages %s kept their caches, %s recomputed %d rows in %.0f ms",
                session.session_id,
                resumed.kept,
                resumed.filled,
                resumed.rows,
                resumed.ms,
            )
        return resumed

    async def _replay(self, session: SessionHistory, pipe, epoch: int) -> None:
        """Open `session` on `pipe` and feed its history again, call by call as it was fed (the same shapes
        compute the same KV cache, bit for bit). Only the last call is awaited: the others stream through
        the ring back to back, one per batch on every node (node/service/batching.py)."""
        await self._guard(pipe.open(session.session_id, session.sampling, session.max_len), 0)
        calls, token = session.replay_calls(), None
        for i, (start, chunk) in enumerate(calls):
            # sample at the end: it awaits every call, and its draw (by seed and position) repeats history
            last = i == len(calls) - 1
            step = pipe.step(session.session_id, start, chunk, sample=last)
            token = await self._guard(step, sum(map(len, calls[i:])))
        tokens = session.replay_tokens()
        session.epoch = epoch
        if session.predicted is not None and session.predicted[0] == len(tokens) and token is not None:
            if token != session.predicted[1]:
                log.warning(
                    "session %s: the rebuilt cache predicts token %d where the first run made %d (a layer "
                    "boundary moved: only f32 shards are bit-identical across splits); going on with %d",
                    session.session_id,
                    token,
                    session.predicted[1],
                    session.predicted[1],
                )

    def _resumed(self, failure: NodeFailure) -> None:
        """A call that met `failure` has its result on the new plan: the recovery's `resumed_ms` (at the
        first such call, from the start of the call whose failure began the recovery) is what a client
        waited for its next token."""
        for i in range(len(self.events) - 1, -1, -1):
            event = self.events[i]
            if event.outcome == "recovered" and event.started >= failure.t0:
                if not event.resumed_ms:
                    event.resumed_ms = (time.perf_counter() - (event.origin or failure.t0)) * 1e3
                    self.recoveries[i] = event.to_dict()
                return

    def _record(self, event: RecoveryEvent) -> None:
        self.events.append(event)
        self.recoveries.append(event.to_dict())
        (log.warning if event.outcome == "recovered" else log.error)("edgeshard: %s", event.summary())

    def _retire(self, pipe, end_sessions: bool = True) -> None:
        """Close a given-up pipeline in the background (its aclose waits for queued writes): end its sessions
        first (surviving nodes free them; failed prefill chunks are collected), then its streams. Without
        `end_sessions` (the nodes run a new plan that resumes them) only the streams close."""

        async def retire(sessions: list[str]) -> None:
            for session_id in sessions if end_sessions else ():
                with contextlib.suppress(ClusterError):
                    await pipe.close(session_id)
            await pipe.aclose()

        task = asyncio.ensure_future(retire(list(self.sessions)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def rebalance(self) -> RecoveryEvent | None:
        """Move to the placement over every live node when the cost model predicts it faster, only while no
        session is open (requests arriving meanwhile wait for it); the event, or None when nothing moved."""
        if self.state != "serving" or self.broken is not None or self.sessions:
            return None
        async with self._lock:
            if self.state != "serving" or self.sessions:
                return None
            t0 = time.perf_counter()
            try:
                placement = await self.replanner.place_better(self.deployment.plan)
            finally:
                self.watchdog.note(self.replanner.probes)
            if placement is None or self.sessions:  # a session opened meanwhile: not now
                return None
            self._ready.clear()  # from now on, new calls wait for the new plan
            self._retire(self.pipeline)
            event = RecoveryEvent(time.time(), "nodes outside the plan are live", [])
            event.replan_ms = (time.perf_counter() - t0) * 1e3
            try:
                await self._rebuild(event, placement)
            except ClusterError as e:  # the new nodes failed while loading, and so on: a recovery's outcome
                event.outcome, event.error = "failed", str(e)
                self.broken = ClusterError(f"re-balance failed: {e}")
                self.state = "down"
                self._retry = asyncio.ensure_future(self._retry_loop())
            finally:
                event.pause_ms = (time.perf_counter() - t0) * 1e3
                self._record(event)
                self._ready.set()
            return event

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.rebalance_s)
            try:
                await self.rebalance()
            except Exception:  # a bug must not end the loop silently, nor the server
                log.exception("re-balance check failed")

    async def _retry_loop(self) -> None:
        """While down: place again every `retry_s`; serve again (a new epoch) once the nodes can hold it."""
        while self.broken is not None:
            await asyncio.sleep(self.policy.retry_s)
            async with self._lock:
                event = RecoveryEvent(time.time(), f"retrying after: {self.broken}", [])
                try:
                    await self._rebuild(event)
                except ClusterError as e:
                    if isinstance(e, CapacityError):
                        self.broken = e  # the latest reason (nodes may have come and gone)
                    log.debug("still down: %s", e)
                    continue
                event.cause = "enough nodes are back"
                event.pause_ms = (time.perf_counter() - event.started) * 1e3
                self.broken = None
                self._record(event)


_QUIET = Console(stderr=True, quiet=True)  # deploy() draws no progress bars during a recovery


def resilient(
    deployment,
    pipeline,
    model_path,
    *,
    plan=None,
    candidates=None,
    sessions: int = 1,
    policy: RecoveryPolicy | None = None,
) -> ResilientPipeline:
    """A ResilientPipeline over a fresh `deploy()`: it re-places over `candidates` (addresses, or a coroutine
    function returning them; default: the deployment's nodes), budgeting KV cache as the planner's `plan`
    did (else `sessions` x the default context), and splits evenly unless a planner placed it."""
    from edgeshard.coordinator.placement.planner import DEFAULT_CONTEXT
    from edgeshard.node.model.cost import ModelCost
    from edgeshard.node.weights.checkpoint import open_checkpoint

    quant = deployment.shards[0].quant  # what the nodes run: loading it again is a match, not a reload
    cost = ModelCost.of(open_checkpoint(model_path).config, quant)
    replanner = Replanner(
        candidates if candidates is not None else [c.address for c in deployment.clients],
        cost,
        model=deployment.shards[0].model,
        context=plan.context if plan is not None else DEFAULT_CONTEXT,
        sessions=plan.sessions if plan is not None else sessions,
        objective=plan.objective if plan is not None else "latency",
        even=plan is None,
    )
    return ResilientPipeline(
        deployment,
        pipeline,
        replanner,
        model_ref=deployment.shards[0].model,
        quant=quant,
        plan=plan,
        policy=policy,
    )
