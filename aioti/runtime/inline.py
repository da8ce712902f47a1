"""On-loop runs (`Batching(on_loop=True)`): batches run on the event loop's own thread.

Submitting does not wake a worker: the first request a loop queues schedules, on that loop, a
run of the queued requests once the loop's ready tasks have run (`Loop.soon`); its results for
that loop are settled in place, others posted. A loop that finds more than a batch queued
schedules itself again. The workers stay as the fallback: they take what is queued when a
pause or closing wakes them.

A model too slow for this mode is said, not silently blocking: two on-loop batches in a row that
each keep their loop `ON_LOOP_WARN_S` or longer warn, once per model (one alone may be a garbage
collection pause that landed in it).
"""

from __future__ import annotations

import time

from ..loops import Loop
from .delivery import warn_on_loop
from .queue import RequestQueue
from .worker import BatchRunner

__all__ = ["ON_LOOP_WARN_S", "OnLoop"]

#: seconds an on-loop batch may keep its loop before it counts as slow
ON_LOOP_WARN_S = 0.01


class OnLoop:
    def __init__(self, queue: RequestQueue, runner: BatchRunner) -> None:
        self._queue = queue
        self._runner = runner
        self._warned = False
        self._slow_before: float | None = None  # the last batch's time, if slow

    def run(self, loop: Loop) -> None:
        """On `loop`'s thread, after its ready tasks: run a batch of the queued requests,
        whichever loop they came from, right here."""
        taken = self._queue.take_here(loop)
        if taken is None:
            return
        batch, busy, more = taken
        if more:  # more than a batch was queued: go on after this loop's ready tasks
            loop.soon(self.run, loop)
        t0 = time.perf_counter()
        self._runner.run_here(batch, busy, loop)
        took = time.perf_counter() - t0
        if took < ON_LOOP_WARN_S:
            self._slow_before = None
            return
        if self._slow_before is not None and not self._warned:
            self._warned = True
            warn_on_loop(
                f"on-loop batches (this one of {len(batch)} requests) kept the event loop busy "
                f"for {min(took, self._slow_before) * 1e3:.1f} ms or more each, twice in a row; "
                "on_loop=True suits models whose batched run takes microseconds "
                "(Batching(on_loop=False) runs batches in a worker thread)")
        self._slow_before = took
