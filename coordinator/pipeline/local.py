"""`ThreadedLocalPipeline`: every stage in this process, behind the async `Pipeline` protocol, computing in a
worker thread so a server's event loop stays responsive (`generate.AsyncLocalPipeline` computes inline, which
suits one generation from the command line but would stall every other request of a server)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgeshard.node.model.executor import LocalPipeline
from edgeshard.node.model.sampling import SamplingParams


class ThreadedLocalPipeline:
    """`LocalPipeline` behind the async `Pipeline` protocol, computing in one worker thread.

    The server's event loop stays free (streams flush, other requests are admitted) while a step runs; one
    thread serializes the steps, because the executors' caches are not thread-safe.
    """

    def __init__(self, local: LocalPipeline) -> None:
        self.local = local
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="edgeshard-local")

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def open(self, session_id: str, sampling: SamplingParams, max_len: int = 0) -> None:
        await self._call(self.local.open, session_id, sampling, max_len)

    async def step(self, session_id: str, start: int, tokens: list[int], sample: bool = True) -> int | None:
        return await self._call(self.local.step, session_id, start, tokens, sample)

    async def verify(self, session_id: str, start: int, tokens: list[int], draft: list[int]) -> list[int]:
        return await self._call(self.local.verify, session_id, start, tokens, draft)

    async def close(self, session_id: str) -> None:
        # shielded: closing runs during cancellation, and a cancelled wait must not drop the queued close
        await asyncio.shield(self._call(self.local.close, session_id))

    def stage_stats(self) -> list[dict[str, Any]]:
        """Per stage: layers, steps run, milliseconds per step, sessions and KV bytes held now."""
        return [
            {
                "stage": i,
                "node": "local",
                "start_layer": ex.spec.start_layer,
                "end_layer": ex.spec.end_layer,
                "steps": ex.steps,
                "compute_ms_per_step": round(1000 * ex.compute_s / max(1, ex.steps), 3),
                "compute_ms": round(1000 * ex.compute_s, 3),  # total (the dashboard takes differences)
                "sessions": len(ex.sessions),
                "kv_bytes": ex.kv_bytes(),
            }
            for i, ex in enumerate(self.local.executors)
        ]

    def shutdown(self) -> None:
        """Stop the worker thread (after the running step)."""
        self.worker.shutdown(wait=True)
